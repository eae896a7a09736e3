"""Which checkpoints get a picture during pretraining (the controller-side callback's rule)."""

from __future__ import annotations

from ray.train import Checkpoint

from pipelines.visualize.during_training import PicturesAtCheckpoints

CKPT = Checkpoint("/nonexistent/xtra-test/checkpoint")  # pinning an empty checkpoint links nothing


class Recorder:
    """Stands in for the renderer actor handle: records `submit.remote(step, checkpoint)`."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.submit = self

    def remote(self, step: int, checkpoint: object) -> None:
        self.steps.append(step)


def drive(every: int, final: int, start: int, ckpt_every: int, log_every: int = 1) -> list[int]:
    rec = Recorder()
    cb = PicturesAtCheckpoints(rec, every, final, start)  # type: ignore[arg-type]
    for step in range(start + 1, final + 1):
        ckpt = step % ckpt_every == 0 or step == final
        if ckpt or step % log_every == 0:
            cb.after_report(None, [{"step": step}], CKPT if ckpt else None)
    return rec.steps


def test_pictures_at_multiples_of_visualize_every_and_at_the_end():
    assert drive(every=4, final=10, start=0, ckpt_every=2) == [4, 8, 10]
    # checkpoints every 3, pictures every 4: the first checkpoint at or after each multiple
    assert drive(every=4, final=13, start=0, ckpt_every=3) == [6, 9, 12, 13]
    # a resumed invocation (from step 8) and one stopped early (stop_at_step 6)
    assert drive(every=4, final=12, start=8, ckpt_every=2) == [12]
    assert drive(every=4, final=6, start=0, ckpt_every=2) == [4, 6]


def test_a_replayed_report_after_a_restart_is_not_drawn_twice():
    rec = Recorder()
    cb = PicturesAtCheckpoints(rec, 2, 6, 0)  # type: ignore[arg-type]
    for step in (2, 4, 3, 4, 6):  # the worker group restarted from step 2's checkpoint
        cb.after_report(None, [{"step": step}], CKPT)
    assert rec.steps == [2, 4, 6]


def test_a_pinned_checkpoint_survives_the_deletion_of_the_original(tmp_path):
    import shutil

    from pipelines.visualize.during_training import PINNED_DIR, pin

    src = tmp_path / "run" / "checkpoint_step000000002"
    (src / "ds").mkdir(parents=True)
    (src / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (src / "xtra_state.json").write_text("{}")
    pinned = pin(Checkpoint(str(src)))
    shutil.rmtree(src)  # what Ray Train does past train.num_to_keep
    assert pinned.path == str(tmp_path / "run" / PINNED_DIR / "checkpoint_step000000002")
    assert (tmp_path / "run" / PINNED_DIR / "checkpoint_step000000002" / "ds" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
