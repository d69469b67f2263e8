"""The main job's command line: HTML export and argument errors (executing the notebooks is nbval's job)."""

from reid_utils.series import main


def test_html_export_of_the_committed_notebooks(tmp_path, capsys):
    assert main(["--html", "--no_execute", "--out", str(tmp_path), "--only", "01", "04"]) == 0
    pages = sorted(p.name for p in (tmp_path / "html").iterdir())
    assert pages == ["01_data_preparation.html", "04_evaluation.html", "index.html"]
    index = (tmp_path / "html" / "index.html").read_text()
    assert 'href="04_evaluation.html"' in index and "Evaluation: features, CMC and mAP" in index
    page = (tmp_path / "html" / "01_data_preparation.html").read_text()
    assert "data:image/png;base64" in page  # the figures come along
    assert (tmp_path / "notebooks" / "01_data_preparation.ipynb").is_file()


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["--only", "99", "--out", str(tmp_path)]) == 2
    assert "no notebooks match" in capsys.readouterr().err
    assert main(["--inplace", "--no_execute"]) == 2
    assert "would change nothing" in capsys.readouterr().err
