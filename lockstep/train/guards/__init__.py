"""Checks that may stop or skip a step: non-finite losses and gradients (and where they began), loss
spikes."""
