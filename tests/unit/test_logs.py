"""Readable logs: Ray's routine lines (as printed by a real tiny run) are dropped, its problems kept."""

from __future__ import annotations

import logging

import pytest

from mmfusion import logs

# lines a 2-epoch `mmfusion train` of jobs/configs/tiny.yaml printed through Ray (Ray 2.60), verbatim
ROUTINE = [
    "2026-11-29 22:16:36,051\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled "
    "for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-11-29 22:16:53,386\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "2026-11-29 22:17:04,911\tINFO streaming_executor.py:371 -- ✔️  Dataset dataset_0356Dy7mFA8vThgfK93dup_0 "
    "execution finished in 11.58 seconds",
    "Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "✔️  Dataset train_0356DzKzQBLcU9I0VHTIEg_0 execution finished in 0.07 seconds",
    "Requesting resources: {'CPU': 0.5} * 1",
    "Attempting to start training worker group of size 1 with the following resources: [{'CPU': 0.5}] * 1",
    "Started training worker group of size 1: ",
    "- (ip=192.0.2.2, pid=3009) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=1]",
    "[2026-11-29 22:17:33,739 E 2759 2856] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: 'c5652e5a21a275e39d0676cd01000000' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027. Use "
    "`ExecutionOptions.label_selector` to constrain Ray Data work to labeled nodes.",
    "  self.exclude_resources = exclude_resources",
    "[2026-11-29 22:19:42,125 I 6805 6805] logging.cc:303: Set ray log level from environment variable",
    "INFO 2026-11-29 22:32:21,936 default_Ing 91m685bb f132fbfc-6992 -- GET /v1/predict 200 12.6ms",
]
PROBLEMS = [
    "Traceback (most recent call last):",
    '  File "/x/ray/train/v2/_internal/state/util.py", line 55, in is_actor_alive',
    "ConnectionError: Found multiple active Ray instances",
    "2026-11-29 22:17:04,911\tWARNING worker.py:2100 -- A worker died or was killed while executing a task",
    "[2026-11-29 22:17:33,739 E 2759 2856] raylet: Task was killed due to the node running low on memory.",
    "/x/torch/nn/modules/module.py:10: UserWarning: something the user should see",
    "  warnings.warn(msg)",
    "epoch 1/2  train loss 2.3156 acc 0.1050 | val loss 2.3060 acc 0.1000",
    "WARNING 2026-11-29 22:32:28,604 controller 29237 -- Deployment 'Fusion' has 1 unhealthy replica",
]


def test_routine_ray_lines_are_dropped_and_problems_kept():
    assert logs.keep(ROUTINE) == []
    assert logs.keep(PROBLEMS) == PROBLEMS
    assert logs.keep(ROUTINE + PROBLEMS) == PROBLEMS


def test_a_dropped_warning_takes_only_its_own_source_line():
    warning = next(i for i, line in enumerate(ROUTINE) if "RayDeprecationWarning" in line)
    lines = [ROUTINE[warning], ROUTINE[warning + 1], "  indented user output", PROBLEMS[0]]
    assert logs.keep(lines) == ["  indented user output", PROBLEMS[0]]


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


@pytest.fixture
def default_level():
    before = logs.is_verbose()
    logs._state["verbose"] = False
    yield
    logs._state["verbose"] = before


def test_ray_records_below_warning_and_routine_warnings_are_filtered(default_level):
    f = logs.NoiseFilter()
    assert not f.filter(_record("ray.data", logging.INFO, "Registered dataset logger"))
    assert not f.filter(_record("ray.data", logging.WARNING, ROUTINE[3]))
    assert f.filter(_record("ray.data", logging.WARNING, "the dataset has 0 blocks"))
    assert f.filter(_record("mmfusion.train", logging.INFO, "Dataset x execution finished in 1 s"))
    logs._state["verbose"] = True
    assert f.filter(_record("ray.data", logging.INFO, "Registered dataset logger"))


def test_worker_output_filter_switches_with_verbose(default_level):
    got: list[list[str]] = []
    handle = logs._filtered(lambda data: got.append(data["lines"]))
    assert logs._filtered(handle) is handle  # installed once, however often init_ray runs
    handle({"lines": ROUTINE, "pid": 1})
    handle({"lines": ROUTINE[:2] + PROBLEMS[:1], "pid": 1})
    assert got == [PROBLEMS[:1]]
    logs._state["verbose"] = True
    handle({"lines": ROUTINE[:1], "pid": 1})
    assert got[-1] == ROUTINE[:1]


def test_progress_bars_draw_only_where_a_person_watches(monkeypatch, capfd):
    items = [1, 2, 3]
    monkeypatch.setattr(logs, "bars_enabled", lambda: False)  # a log file, a pipe, CI, a Ray worker
    assert logs.progress(items, total=3, desc="shards") is items
    monkeypatch.setattr(logs, "bars_enabled", lambda: True)  # a terminal
    assert list(logs.progress(items, total=3, desc="shards")) == items
    assert "shards" in capfd.readouterr().err
    # pytest's captured streams are no terminal: the real check turns bars off here
    monkeypatch.undo()
    assert logs.bars_enabled() is False


def test_loading_an_hf_model_draws_no_transformers_bar(tmp_path, capfd):
    from tests.tiny_hf import save_tiny_text_model
    from transformers.utils import logging as hf_logging

    from mmfusion.models.encoders import load_hf_model

    bert, _ = save_tiny_text_model(tmp_path)
    hf_logging.enable_progress_bar()  # transformers' default: its "Loading weights" bar on stderr
    capfd.readouterr()
    load_hf_model(str(bert))
    assert "Loading weights" not in capfd.readouterr().err
