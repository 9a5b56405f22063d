"""Gated delta rule (Gated DeltaNet core): chunked prefill (optionally keeping the state at every chunk start),
single-token recurrent decode, the fused decode step of a whole GDN core (conv + gating + norm + recurrence), the
same for k tokens per row keeping what the commit needs after each (verifying draft tokens) with its commit, and
the g/beta gating.

CUDA tensors run ``triton.py`` for the dispatched ops; anything else runs the references in ``ref.py``.
``fused_gdn_multistep`` on CUDA runs two fused launches per layer; the commit over a stack of layers, as the cache
runs it, is ``install_kept_states`` (the conv windows, one copy launch) and ``replay_kept_states`` (the recurrent
states recomputed from the kept positions' inputs, one launch); ``fused_recurrent_gated_delta_rule`` and
``commit_gdn_states`` (one layer, with a host sync to drop skipped rows) run their references on any device."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref
from .ref import commit_gdn_states, fused_recurrent_gated_delta_rule

chunk_gated_delta_rule = dispatch(ref.chunk_gated_delta_rule, "deltaserve.kernels.gated_delta_rule.triton")
fused_gdn_decode = dispatch(ref.fused_gdn_decode, "deltaserve.kernels.gated_delta_rule.triton")
fused_gdn_multistep = dispatch(ref.fused_gdn_multistep, "deltaserve.kernels.gated_delta_rule.triton")
gdn_gating = dispatch(ref.gdn_gating, "deltaserve.kernels.gated_delta_rule.triton")
install_kept_states = dispatch(ref.install_kept_states, "deltaserve.kernels.gated_delta_rule.triton")
replay_kept_states = dispatch(ref.replay_kept_states, "deltaserve.kernels.gated_delta_rule.triton")

__all__ = ["chunk_gated_delta_rule", "commit_gdn_states", "fused_gdn_decode", "fused_gdn_multistep",
           "fused_recurrent_gated_delta_rule", "gdn_gating", "install_kept_states", "replay_kept_states"]
