"""Loaded by every Python process of a test that puts this folder on PYTHONPATH: makes the rank
named by SODA_TEST_FAIL_RANK raise in its second training step, to test how a job dies."""

import os

if "SODA_TEST_FAIL_RANK" in os.environ:
    import soda.loop

    _original = soda.loop.Trainer.train_step

    def _failing(self, images):
        if self.global_step == 1 and os.environ.get("RANK") == os.environ["SODA_TEST_FAIL_RANK"]:
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
        return _original(self, images)

    soda.loop.Trainer.train_step = _failing
