"""Which implementation ``lola_chat.kernels.lola`` dispatches to."""

from __future__ import annotations

import torch
from lola_chat.kernels import lola


def test_cpu_tensors_use_the_reference():
    assert not lola.uses_triton(torch.zeros(2), torch.zeros(2))


def test_reference_can_be_forced(monkeypatch):
    x = torch.zeros(2)
    with lola.force_reference():
        assert not lola.uses_triton(x)
    monkeypatch.setenv(lola.REFERENCE_ENV, "1")
    assert not lola.uses_triton(x)


def test_dispatched_hedgehog_equals_reference_on_cpu():
    x = torch.randn(1, 2, 3, 16)
    w = torch.randn(2, 16, 16)
    torch.testing.assert_close(lola.hedgehog(x, w), lola.reference.hedgehog(x, w), atol=0, rtol=0)


def test_float64_stays_on_the_reference():
    assert not lola.uses_triton(torch.zeros(2, dtype=torch.float64))


def test_no_dependent_launch_off_the_gpu():
    from lola_chat.kernels.dispatch import dependent_launch, launch_options

    assert launch_options(torch.zeros(2)) == {"PDL": False}
    with dependent_launch(False):
        assert launch_options(torch.zeros(2)) == {"PDL": False}
