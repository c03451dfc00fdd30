"""The sync-free EMA against ema-pytorch's, on the CPU and (`cuda` parameter) on a GPU."""

import pytest
import torch
from ema_pytorch import EMA

from soda.ema import SyncFreeEMA
from tests.helpers import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_sync_free_ema_matches_ema_pytorch_and_resumes(tmp_path, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).to(device)
    settings = dict(beta=0.999, update_after_step=0, update_every=2, power=0.6666667, include_online_model=False)
    reference, ours = EMA(model, **settings), SyncFreeEMA(model, **settings)

    def train(steps, *emas):
        for _ in range(steps):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.1)
            model(torch.randn(8, 4, device=device))
            for ema in emas:
                ema.update()

    train(30, reference, ours)
    torch.save(ours.state_dict(), tmp_path / "ema.pt")
    resumed = SyncFreeEMA(model, **settings)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True, map_location=device))
    train(30, reference, ours, resumed)
    for other in (ours, resumed):
        assert other.step.item() == reference.step.item() == 60
        expected, got = reference.ema_model.state_dict(), other.ema_model.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected)
