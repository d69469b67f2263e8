"""The main job's command line: HTML export, profiles, failures and argument errors (nbval executes the notebooks)."""

import nbformat
import pytest

from reid_utils.series import inject_profile, kernel_manager_config, main, show_progress_bars_as_they_ended


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
    assert main(["--inplace", "--profile", "market-gpu"]) == 2
    assert "--profile without --inplace" in capsys.readouterr().err
    assert main(["--timeout", "0", "--out", str(tmp_path)]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_a_bad_market_folder_is_one_line_before_any_notebook_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REID_DATASET", raising=False)
    monkeypatch.setenv("MARKET1501_DIR", str(tmp_path / "not-market"))
    assert main(["--out", str(tmp_path / "build")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("series: error: $MARKET1501_DIR=")
    assert str(tmp_path / "not-market") in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "build").exists()


def test_the_profile_goes_right_after_the_parameters_cell():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("PROFILE = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(PROFILE)"),
    ]
    assert inject_profile(notebook, "market-gpu")
    assert [cell.source for cell in notebook.cells][1:3] == [
        "PROFILE = None",
        "PROFILE = 'market-gpu'  # injected by python -m reid_utils.series --profile",
    ]
    assert not inject_profile(nbformat.v4.new_notebook(), "cpu-demo")  # no parameters cell: nothing to do


def _notebook(folder, name, *sources):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(f"# {name}")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(notebook, folder / f"{name}.ipynb")


def test_a_failing_notebook_is_one_line_and_kept_and_the_others_still_run(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder, "01_fails", "x = 1", "raise ValueError('the data set is not where you said')", "print('never')")
    _notebook(folder, "02_slow", "import time", "time.sleep(30)")
    _notebook(folder, "03_works", "print('fine')")
    code = main(["--notebooks", str(folder), "--out", str(tmp_path / "build"), "--timeout", "3"])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("series: error:")]
    assert len(errors) == 2 and "Traceback" not in captured.err and "\x1b[" not in captured.err
    assert "01_fails.ipynb, cell 2: ValueError: the data set is not where you said" in errors[0]
    assert "02_slow.ipynb: a cell ran longer than --timeout 3 seconds" in errors[1]
    kept = nbformat.read(tmp_path / "build" / "failed" / "01_fails.ipynb", as_version=4)
    assert kept.cells[1].execution_count == 1 and not kept.cells[3].get("outputs")  # as far as it ran
    summary = captured.out.splitlines()
    assert any("01_fails.ipynb" in line and "FAILED" in line for line in summary)
    assert any("03_works.ipynb" in line and " ok " in line for line in summary)  # the failures did not stop it
    assert "2 of 3 notebooks failed" in captured.err


@pytest.mark.parametrize(("value", "shown"), [(9100, "|██████████| 9100/9100"), (4550, "|█████     | 4550/9100")])
def test_progress_bars_are_shown_as_they_ended(value, shown):
    notebook = nbformat.v4.new_notebook()
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    cell = nbformat.v4.new_code_cell("train(...)")
    data = {"application/vnd.jupyter.widget-view+json": view, "text/plain": "cpu_demo:   0%|          | 0/9100"}
    cell.outputs = [nbformat.v4.new_output("display_data", data)]
    notebook.cells = [cell]
    state = {
        "box": {"state": {"children": ["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]}},
        "left": {"state": {"value": "cpu_demo:\u2007100%"}},
        "bar": {"state": {"value": value, "max": 9100}},
        "right": {"state": {"value": f"\u2007{value}/9100\u2007[00:22&lt;00:00]"}},
    }
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    show_progress_bars_as_they_ended(notebook)
    text = cell.outputs[0]["data"]["text/plain"]
    assert shown in text and "[00:22<00:00]" in text and "0/9100" not in text.replace(f"{value}/9100", "")


def test_notebooks_03_and_04_under_another_profile_evaluate_the_run_03_trained(tmp_path, capsys):
    """The real path's wiring, with a profile that fits the suite: 04 finds and evaluates 03's run of that profile."""
    from reid_utils.data import repo_root
    from reid_utils.runs import load_options

    run = repo_root() / "model" / "cpu_quick"
    assert main(["--profile", "cpu-quick", "--only", "03", "04", "--out", str(tmp_path)]) == 0
    trained = load_options(run)
    assert (trained.backbone, trained.height, trained.width, trained.total_epoch) == ("resnet18", 32, 16, 4)
    evaluation = nbformat.read(tmp_path / "notebooks" / "04_evaluation.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for cell in evaluation.cells for o in cell.get("outputs", []))
    assert "Using the model trained in notebook 03: model/cpu_quick/net_last.pth" in printed  # not trained again
    assert "PROFILE = 'cpu-quick'" in "".join(cell.source for cell in evaluation.cells)
    training = nbformat.read(tmp_path / "notebooks" / "03_training.ipynb", as_version=4)
    assert "profile: cpu-quick" in "".join(o.get("text", "") for o in training.cells[3].outputs)


def test_the_test_setup_imports_no_torch():
    """conftest.py imports this module in pytest-xdist's controller too, which runs no test: torch and
    torchvision there would only delay the start of both workers (~4 s)."""
    import subprocess
    import sys

    code = "import sys, reid_utils.series; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_real_ablation_of_notebook_06_starts_only_when_switched_on(capsys):
    """With a GPU and Market-1501, notebook 06's ablation would train 300 ResNet-50 epochs (~4 h): it states the cost
    and waits for TRAIN_THE_REAL_ABLATION = True; until then it runs the small ablation (issue #21)."""
    import ast

    from reid_utils.data import repo_root

    cells = {cell.get("id"): cell.source for cell in nbformat.read(
        repo_root() / "notebooks" / "06_going_further.ipynb", as_version=4).cells}  # fmt: skip
    imports = ast.parse(cells["7a48b486"])  # the notebook's own imports (PROFILES, wherever it lives)
    imports.body = [node for node in imports.body if isinstance(node, ast.Import | ast.ImportFrom)]
    for switched_on in (False, True):
        namespace: dict = {"profile": "market-gpu"}
        exec(compile(imports, "<06 imports>", "exec"), namespace)
        switch = cells["real-ablation-switch"].replace("TRAIN_THE_REAL_ABLATION = False", f"TRAIN_THE_REAL_ABLATION = "
                                                                                          f"{switched_on}")  # fmt: skip
        exec(switch, namespace)
        exec(cells["7ce385e4"], namespace)
        printed = capsys.readouterr().out
        total = len(namespace["steps"]) * len(namespace["seeds"]) * namespace["setting"]["total_epoch"]
        if switched_on:
            assert (namespace["setting"]["backbone"], total) == ("resnet50", 300)
        else:
            assert "about 4 h on one GPU" in printed and "TRAIN_THE_REAL_ABLATION = True" in printed
            assert namespace["setting"]["backbone"] == "resnet18" and total == 30
            assert namespace["setting"]["gpu_ids"] == "0"  # the small ablation on the GPU that is there


def test_the_runner_prints_only_its_own_lines_and_saves_static_pictures(tmp_path):
    """A run's stderr stays empty (no kernel warning per notebook); the executed notebook shows, without a
    live kernel, the picture and text its widgets carry, and names the kernel as JupyterLab would."""
    import subprocess
    import sys

    from ipykernel.kernelspec import KERNEL_NAME, get_kernel_dict

    folder = tmp_path / "notebooks"
    folder.mkdir()
    draw = "lambda q: plt.figure(figsize=(1, 1))"
    _notebook(
        folder, "01_widgets",
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='bar'):\n    pass",
        f"import matplotlib.pyplot as plt\nfrom reid_utils.visualize import QueryBrowser\nQueryBrowser({draw}, 2)",
    )  # fmt: skip
    command = [sys.executable, "-m", "reid_utils.series", "--notebooks", str(folder), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stderr == ""
    assert [line.split()[0] for line in done.stdout.split("\n") if line] == ["01_widgets.ipynb", "all"]
    executed = nbformat.read(tmp_path / "out" / "notebooks" / "01_widgets.ipynb", as_version=4)
    bar, browser = (cell.outputs for cell in executed.cells[1:])
    shown = [output["data"] for output in bar + browser if "data" in output]
    assert all("application/vnd.jupyter.widget-view+json" not in data for data in shown)
    assert any("bar: 100%|██████████| 3/3" in data.get("text/plain", "") for data in shown)
    assert any("image/png" in data and "QueryBrowser over 2 queries" in data["text/plain"] for data in shown)
    assert "widgets" not in executed.metadata  # no state for views that are gone
    installed = get_kernel_dict()
    assert executed.metadata.kernelspec == {
        "name": KERNEL_NAME, "display_name": installed["display_name"], "language": installed["language"]
    }  # fmt: skip


def test_the_kernels_connection_is_encrypted_where_pyzmq_can(monkeypatch):
    import zmq

    assert kernel_manager_config().KernelManager.transport_encryption == "auto"  # jupyter_client >= 8.10 here
    monkeypatch.setattr(zmq, "has", lambda feature: False)  # a pyzmq without CurveZMQ: the setting would fail
    assert kernel_manager_config() == {}


def _ablation_plan(profile: str) -> dict:
    """Notebook 06's ablation cell run on its own under ``profile``: its setting, seeds and steps."""
    from reid_utils.data import repo_root
    from reid_utils.profiles import PROFILES

    notebook = nbformat.read(repo_root() / "notebooks" / "06_going_further.ipynb", as_version=4)
    cell = next(cell for cell in notebook.cells if cell.cell_type == "code" and "seeds = " in cell.source)
    switch = next(cell for cell in notebook.cells if cell.get("id") == "real-ablation-switch")
    namespace = {"PROFILES": PROFILES, "profile": profile}
    exec(switch.source, namespace)  # off: the ablation a student runs
    exec(cell.source, namespace)  # the notebook's own code: it defines and prints, it trains nothing
    return namespace


def test_the_ablation_of_notebook_06_follows_the_profile(capsys):
    """``series --profile cpu-quick`` is the quick check of a laptop: 06's fifteen trainings were most of it."""
    from reid_utils.profiles import PROFILES

    def trained_epochs(plan: dict) -> int:
        return len(plan["steps"]) * len(plan["seeds"]) * plan["setting"]["total_epoch"]

    demo, quick = _ablation_plan("cpu-demo"), _ablation_plan("cpu-quick")
    assert (len(demo["seeds"]), demo["setting"]["total_epoch"]) == (3, 2)  # the documented ablation, unchanged
    assert trained_epochs(quick) * 3 <= trained_epochs(demo) and len(quick["seeds"]) >= 2  # still a spread
    assert quick["setting"]["backbone"] == PROFILES["cpu-quick"]["backbone"]
    assert "5 settings x 2 seeds" in capsys.readouterr().out
