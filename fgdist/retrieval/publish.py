"""The end of a training run: what rank 0 publishes once the results are written.

The trainer does not import this (training sits below retrieval and report, fgdist.LAYERS); the
launcher hands `publish_run` to it. The MLflow model is part of the run: a failure to log it
fails the run. The pictures are extras: a failure is logged and the run still finishes.
"""

from __future__ import annotations

import logging

from fgdist.report.pictures import log_pictures
from fgdist.retrieval.export import log_trained_model
from fgdist.training.model import model_for_eval
from fgdist.training.trainer import FinishedRun

log = logging.getLogger("fgdist.retrieval.publish")


def publish_run(run: FinishedRun) -> None:
    """The MLflow model, then (eval.pictures) attention maps and the retrieval grid."""
    log_trained_model(run.model, run.cfg, run.tracker)
    if run.cfg.eval.pictures:
        publish_pictures(run)


def publish_pictures(run: FinishedRun) -> None:
    """Attention maps and the retrieval grid as artifacts; a failure is reported, not raised."""
    ev = run.cfg.eval
    try:
        paths = log_pictures(
            model_for_eval(run.model, ev.features),
            run.test_split,
            run.cfg.data,
            run.cfg.run_dir / "pictures",
            run.device,
            ev.picture_queries,
            ev.batch_size,
        )
    except Exception as err:
        log.warning(f"pictures failed ({type(err).__name__}: {str(err)[:300]}); results are written")
        return
    for path in paths:
        run.tracker.log_artifact(str(path), "pictures")
    log.info("pictures " + ", ".join(str(p) for p in paths))
