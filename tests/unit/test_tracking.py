"""The tracker: a no-op where disabled (ranks other than 0), flat params."""

from fgdist.training.tracking import Tracker, flatten


def test_a_disabled_tracker_accepts_every_call_and_logs_nothing():
    tracker = Tracker(enabled=False, uri="sqlite:///never-created.db", experiment="x", run_name="r")
    tracker.log_params({"optim.lr": "0.1"})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact("results.json")
    tracker.set_tags({"objective": "base"})
    tracker.finish()
    assert tracker.run_id is None and not tracker.enabled


def test_flatten_makes_dotted_string_params():
    assert flatten({"optim": {"lr": 0.1, "milestones": [1, 2]}, "name": "run", "deepspeed": {}}) == {
        "optim.lr": "0.1",
        "optim.milestones": "[1, 2]",
        "name": "run",
        "deepspeed": "{}",
    }
