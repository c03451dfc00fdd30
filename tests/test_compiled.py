"""torch.compile of the loss, and its fallback to eager."""

import logging

import pytest
import torch

from soda.compiled import compile_loss


def test_compile_falls_back_to_eager_only_when_compiling_fails(caplog, monkeypatch):
    def loss(x):
        return x.sum()

    assert compile_loss(loss, "none", torch.device("cpu")) is loss
    assert compile_loss(loss, "auto", torch.device("cpu")) is loss  # auto: eager on a CPU

    def broken_compile(fn, mode=None):
        def compiled(*args):
            raise torch._dynamo.exc.TorchDynamoException("backend compiler failed: no C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        wrapped = compile_loss(loss, "default", torch.device("cpu"))
        assert wrapped(torch.ones(3)).item() == 3.0
    assert "torch.compile failed" in caplog.text

    def failing_later(fn, mode=None):
        calls = []

        def compiled(*args):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError("a real error")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", failing_later)
    wrapped = compile_loss(loss, "default", torch.device("cpu"))
    wrapped(torch.ones(2))
    with pytest.raises(ValueError, match="a real error"):
        wrapped(torch.ones(2))
