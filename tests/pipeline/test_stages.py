import json

import yaml

from pipeline.cli import _short
from pipeline.cli import main as cli
from pipeline.recipe import load_recipe
from pipeline.rundir import RunDir
from pipeline.stages import stage_state


def manifests(run):
    return {s: json.loads((run / s / "manifest.json").read_text()) for s in ("harvest", "curate")
            if (run / s / "manifest.json").exists()}


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(project, capsys):
    recipe = project()
    run = recipe.parent / "runs" / "t"
    assert cli(["curate", str(recipe)]) == 0
    first = manifests(run)
    assert first["harvest"]["status"] == first["curate"]["status"] == "complete"
    assert set(first["curate"]["outputs"]) >= {"train.parquet", "val.parquet", "test.parquet", "rejected.parquet",
                                               "report.json"}
    capsys.readouterr()
    assert cli(["curate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "harvest: unchanged" in out and "curate: unchanged" in out
    assert "done: nothing to do" in out and "harvest, curate unchanged since their last run" in out
    assert manifests(run) == first

    # Change a curate setting: curate reruns, harvest does not; status shows it stale before.
    data = yaml.safe_load(recipe.read_text())
    data["curate"]["split"]["test_fraction"] = 0.3
    recipe.write_text(yaml.safe_dump(data))
    r = load_recipe(recipe)
    assert stage_state(r, RunDir(run), "harvest")[0] == "complete"
    assert stage_state(r, RunDir(run), "curate")[0] == "stale"
    assert stage_state(r, RunDir(run), "train")[0] == "missing"
    assert stage_state(r, RunDir(run), "evaluate")[0] == "waiting"
    capsys.readouterr()
    assert cli(["status", str(recipe)]) == 0
    status = capsys.readouterr().out
    assert "stale" in status and "records_in=" in status and "…" not in status  # counts wrap, never cut
    assert max(len(line) for line in status.splitlines()) <= 80
    assert [_short(v) for v in (0.9965870307, 3055, True, "full")] == ["0.997", "3,055", "True", "full"]
    assert cli(["curate", str(recipe)]) == 0
    out = capsys.readouterr().out
    second = manifests(run)
    assert "harvest: unchanged" in out and "curate: unchanged" not in out
    assert "done: curate (harvest unchanged, skipped)" in out
    assert second["harvest"] == first["harvest"]
    assert second["curate"]["fingerprint"] != first["curate"]["fingerprint"]
    assert second["curate"]["counts"]["splits"]["test"] > first["curate"]["counts"]["splits"]["test"]

    # New logs arrive: harvest reruns, and so does curate.
    from curation.harvest.demo_traffic import write_demo

    write_demo(recipe.parent / "logs", {"2026-11-24": 100})
    assert cli(["curate", str(recipe)]) == 0
    third = manifests(run)
    assert third["harvest"]["counts"]["records"] > second["harvest"]["counts"]["records"]
    assert third["curate"]["fingerprint"] != second["curate"]["fingerprint"]


def test_a_locked_run_directory_is_refused(project, capsys):
    recipe = project()
    run = RunDir(recipe.parent / "runs" / "t")
    with run.lock("test holder"):
        assert cli(["harvest", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "is in use by pid" in err and "test holder" in err
    assert not (run.path / "harvest").exists()
    assert cli(["harvest", str(recipe)]) == 0  # released


def test_a_failed_stage_leaves_nothing_complete_and_a_rerun_finishes(project, monkeypatch, capsys):
    recipe = project()
    import curation.curate.stage

    real = curation.curate.stage.run

    def crash(ctx):
        (ctx.work / "train.parquet").write_text("half written")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(curation.curate.stage, "run", crash)
    assert cli(["curate", str(recipe)]) == 1
    assert "stage 'curate' failed: RuntimeError: disk on fire" in capsys.readouterr().out
    run = recipe.parent / "runs" / "t"
    assert (run / "harvest" / "manifest.json").exists()
    assert not (run / "curate").exists()
    assert stage_state(load_recipe(recipe), RunDir(run), "curate")[0] == "partial"
    monkeypatch.setattr(curation.curate.stage, "run", real)
    assert cli(["curate", str(recipe)]) == 0
    assert json.loads((run / "curate" / "manifest.json").read_text())["status"] == "complete"


# The kill-and-resume test of the train stage lives in tests/train/test_train_resume.py.


def test_a_forced_rerun_that_reproduces_the_data_does_not_rerun_what_follows(project, capsys):
    """Reports carry timings; only data files count in the next stage's fingerprint."""
    recipe = project()
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    before = json.loads((run / "curate" / "manifest.json").read_text())
    assert cli(["harvest", str(recipe), "--force"]) == 0
    capsys.readouterr()
    assert cli(["curate", str(recipe)]) == 0
    assert "curate: unchanged" in capsys.readouterr().out
    assert json.loads((run / "curate" / "manifest.json").read_text()) == before


def test_a_complete_stage_whose_outputs_were_damaged_is_stale_and_reruns(project, capsys):
    """A deleted or truncated output no longer passes for complete: status says why, a rerun redoes the stage."""
    recipe = project()
    run = recipe.parent / "runs" / "t"
    assert cli(["curate", str(recipe)]) == 0
    r = load_recipe(recipe)
    before = json.loads((run / "curate" / "manifest.json").read_text())
    assert before["sizes"]["train.parquet"] == (run / "curate" / "train.parquet").stat().st_size
    (run / "curate" / "train.parquet").unlink()
    state, m = stage_state(r, RunDir(run), "curate")
    assert state == "stale" and m["why"] == "curate/train.parquet is missing"
    capsys.readouterr()
    assert cli(["curate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "curate: complete but curate/train.parquet is missing: running it again" in out
    assert (run / "curate" / "train.parquet").read_bytes()  # written again
    assert stage_state(r, RunDir(run), "curate")[0] == "complete"

    # Truncated: the size no longer matches. Same size, other bytes: only --verify (sha256) sees it.
    path = run / "harvest" / "quarantine.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "has" in stage_state(r, RunDir(run), "harvest")[1]["why"]
    path.write_bytes(data[:-1] + (b"x" if data[-1:] != b"x" else b"y"))
    assert stage_state(r, RunDir(run), "harvest")[0] == "complete"
    state, m = stage_state(r, RunDir(run), "harvest", verify=True)
    assert state == "stale" and m["why"] == "harvest/quarantine.jsonl does not match its sha256 in the manifest"
    capsys.readouterr()
    assert cli(["status", str(recipe), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "stale" in out and "sha256" in out  # the why, wrapped in the table's counts column


def test_a_refused_process_leaves_the_holders_text(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock("nightly job"):
        for _ in range(2):  # the second refusal still names the holder
            try:
                with run.lock("second"):
                    raise AssertionError("the lock was taken twice")
            except RuntimeError as err:
                assert "nightly job" in str(err), err


def test_a_harvest_only_recipe_needs_no_train_evaluate_or_export_section(project, capsys):
    """A recipe that only harvests and curates leaves the later sections out; a stage that needs one says so."""
    recipe = project()
    data = yaml.safe_load(recipe.read_text())
    for section in ("train", "evaluate", "export"):
        data.pop(section)
    recipe.write_text(yaml.safe_dump(data))
    assert cli(["validate", str(recipe)]) == 0
    capsys.readouterr()
    assert cli(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "not run: train, evaluate, route, export (the recipe has no section for them)" in out
    run = recipe.parent / "runs" / "t"
    assert (run / "curate" / "manifest.json").is_file() and not (run / "train").exists()
    assert cli(["evaluate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "evaluate needs the recipe's train and evaluate sections, which the recipe leaves out" in err


def test_status_tells_a_running_stage_from_an_interrupted_one(project):
    recipe = project()
    run = RunDir(recipe.parent / "runs" / "t")
    r = load_recipe(recipe)
    run.begin("harvest", "f" * 64)  # a stage that started and has no manifest yet
    assert stage_state(r, run, "harvest")[0] == "partial"  # nobody holds the lock: it was interrupted
    with run.lock("a nightly run"):
        assert stage_state(r, run, "harvest")[0] == "running"
    assert stage_state(r, run, "harvest")[0] == "partial"
