"""Traffic routing per model: weighted and sticky splits, shadow mirroring, canary rollouts."""
