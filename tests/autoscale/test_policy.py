"""The scaling policy with synthetic backlogs and its own clock: windows, bounds, zero, no flapping."""

from __future__ import annotations

import itertools

import pytest

from layerline.autoscale.policy import AutoscaleConfig, ScalingPolicy, StagePolicy
from layerline.errors import FormatError


def drive(policy: ScalingPolicy, backlogs: list[int], *, start: int = 1, dt: float = 0.5, stage: int = 0):
    """Poll every ``dt`` s with these backlogs, applying each decision at once; the counts after each."""
    current, counts = start, []
    for i, backlog in enumerate(backlogs):
        decision = policy.decide(stage, current, backlog, i * dt)
        assert decision.current == current and decision.backlog == backlog
        current = decision.desired
        counts.append(current)
    return counts


def test_raw_recommendation_is_backlog_over_target_within_bounds():
    policy = ScalingPolicy([StagePolicy(min_replicas=1, max_replicas=5, target=4)])
    assert [policy.raw(0, b) for b in (0, 1, 4, 5, 8, 9, 19, 20, 21, 1000)] == [1, 1, 1, 2, 2, 3, 5, 5, 5, 5]
    zero = ScalingPolicy([StagePolicy(min_replicas=0, max_replicas=3, target=10, activation=2)])
    assert [zero.raw(0, b) for b in (0, 2, 3, 11, 31)] == [0, 0, 1, 2, 3]


def test_scale_up_waits_for_the_up_window_and_ignores_shorter_bursts():
    policy = ScalingPolicy(
        [StagePolicy(min_replicas=1, max_replicas=4, target=4, up_delay_s=2, down_delay_s=60)]
    )
    # a 1.5 s burst (backlog 16 → 4 replicas) is shorter than the 2 s window: nothing happens
    counts = drive(policy, [0] * 6 + [16] * 4 + [0] * 4)
    assert counts == [1] * 14
    # a sustained one: up once the whole window asked for more (t = 2 s after it began), to the lowest
    # recommendation of the window
    policy = ScalingPolicy(
        [StagePolicy(min_replicas=1, max_replicas=4, target=4, up_delay_s=2, down_delay_s=60)]
    )
    counts = drive(policy, [0] * 6 + [12, 12, 16, 16, 16, 16, 16, 16])
    # samples at t=3.0..6.5; t=5.0 is the first poll whose window [3, 5] is all >= 3 → 3; t=6.0: all 4
    assert counts == [1] * 10 + [3, 3, 4, 4]


def test_a_fresh_policy_needs_a_full_window_before_acting():
    policy = ScalingPolicy(
        [StagePolicy(min_replicas=1, max_replicas=4, target=1, up_delay_s=1, down_delay_s=3)]
    )
    assert drive(policy, [100, 100, 100, 100]) == [1, 1, 4, 4]  # up at t = 1.0 s
    policy = ScalingPolicy(
        [StagePolicy(min_replicas=1, max_replicas=4, target=1, up_delay_s=1, down_delay_s=3)]
    )
    assert drive(policy, [0] * 8, start=3) == [3] * 6 + [1, 1]  # down at t = 3.0 s


def test_up_delay_zero_scales_at_once():
    policy = ScalingPolicy(
        [StagePolicy(min_replicas=1, max_replicas=8, target=2, up_delay_s=0, down_delay_s=5)]
    )
    assert drive(policy, [7, 7, 20]) == [4, 4, 8]


def test_scale_down_takes_the_highest_need_of_the_down_window():
    p = StagePolicy(min_replicas=1, max_replicas=4, target=4, up_delay_s=0, down_delay_s=2)
    policy = ScalingPolicy([p])
    # 4 replicas; then the need falls to 2 (backlog 8), then to 1 (idle)
    counts = drive(policy, [16] * 5 + [8] * 6 + [0] * 6)
    # t=2.5..5.0: backlog 8; the window [t-2, t] still holds a 16 until t=4.5 → down to 2 at t=4.5;
    # idle from t=5.5: down to 1 once the window holds no 8 (t=7.5)
    assert counts == [4] * 9 + [2] * 6 + [1] * 2


def test_bounds_are_kept_and_restored_at_once():
    p = StagePolicy(min_replicas=2, max_replicas=3, target=1, up_delay_s=0, down_delay_s=0)
    policy = ScalingPolicy([p])
    assert drive(policy, [0, 0, 100, 100, 0]) == [2, 2, 3, 3, 2]
    out = policy.decide(0, 7, 0, 10.0)
    assert (out.desired, out.reason) == (3, "above the maximum of 3")
    out = policy.decide(0, 0, 100, 11.0)
    assert (out.desired, out.reason) == (2, "below the minimum of 2")


def test_scale_to_zero_when_idle_and_back_when_entries_wait():
    p = StagePolicy(min_replicas=0, max_replicas=3, target=4, up_delay_s=1, down_delay_s=2)
    policy = ScalingPolicy([p])
    # idle: stays at 1 until the down window (2 s) has seen nothing, then 0
    counts = drive(policy, [0] * 6 + [0, 0, 1, 1, 12, 12, 12, 12, 0, 0, 0, 0, 0, 0, 0], dt=0.5)
    assert counts[:4] == [1, 1, 1, 1] and counts[4:8] == [0, 0, 0, 0]
    # one entry waits at t=4.0: a replica at once (activation does not wait for the up window) ...
    assert counts[8] == 1
    # ... a backlog of 12 (3 replicas) from t=5.0 grows it after the 1 s up window (t=6.0)
    assert counts[9:14] == [1, 1, 1, 3, 3]
    # idle again from t=7.0: back to zero once 2 s passed with nothing (t=9.0)
    assert counts[14:] == [3, 3, 3, 3, 0, 0, 0]
    decision = ScalingPolicy([p]).decide(0, 0, 5, 0.0)
    assert decision.desired == 1 and decision.reason.startswith("activation")


def test_activation_threshold_keeps_a_stage_at_zero_for_a_trickle():
    p = StagePolicy(min_replicas=0, max_replicas=2, target=4, up_delay_s=0, down_delay_s=1, activation=3)
    assert drive(ScalingPolicy([p]), [1, 2, 3, 2, 4], start=0) == [0, 0, 0, 0, 1]


def test_no_flapping_when_the_load_swings_between_two_needs():
    p = StagePolicy(min_replicas=1, max_replicas=6, target=4, up_delay_s=2, down_delay_s=5)
    policy = ScalingPolicy([p])
    # 2 replicas; the backlog alternates every poll between 4 (1 replica) and 12 (3 replicas) for a minute
    counts = drive(policy, [4, 12] * 60, start=2)
    assert set(counts) == {2}
    # and between 8 and 9 (2 and 3 replicas) from 3: neither up nor down
    counts = drive(ScalingPolicy([p]), [8, 9] * 60, start=3)
    assert set(counts) == {3}


def test_counting_decisions_over_a_noisy_ramp():
    """A ramp up and down with noise: the count moves monotonically each way, never back and forth."""
    p = StagePolicy(min_replicas=1, max_replicas=8, target=4, up_delay_s=1, down_delay_s=4)
    ramp = [min(40, 2 * i) + (3 if i % 2 else 0) for i in range(40)] + [40 - 2 * i for i in range(21)]
    counts = drive(ScalingPolicy([p]), ramp + [0] * 20, dt=0.25)
    changes = [b - a for a, b in itertools.pairwise(counts) if b != a]
    ups = [c for c in changes if c > 0]
    downs = [c for c in changes if c < 0]
    assert ups and downs and counts[-1] == 1 and max(counts) <= 8
    first_down = changes.index(downs[0])
    assert all(c > 0 for c in changes[:first_down]) and all(c < 0 for c in changes[first_down:])


def test_stages_are_independent():
    fast = StagePolicy(min_replicas=1, max_replicas=1)
    slow = StagePolicy(min_replicas=1, max_replicas=4, target=2, up_delay_s=0, down_delay_s=1)
    policy = ScalingPolicy(AutoscaleConfig((fast, slow, fast)))
    assert policy.decide(0, 1, 50, 0.0).desired == 1
    assert policy.decide(1, 1, 50, 0.0).desired == 4
    assert policy.decide(2, 1, 50, 0.0).desired == 1


def test_settings_are_checked_and_round_trip(tmp_path):
    for bad in (
        {"min_replicas": 3, "max_replicas": 2},
        {"max_replicas": 0},
        {"min_replicas": -1},
        {"target": 0},
        {"up_delay_s": -1},
    ):
        with pytest.raises(ValueError):
            StagePolicy(**bad)
    with pytest.raises(ValueError, match="interval"):
        AutoscaleConfig((StagePolicy(),), interval_s=0)
    config = AutoscaleConfig((StagePolicy(0, 3, 2.5, 1.0, 9.0, 1), StagePolicy(1, 1)), interval_s=0.25)
    config.save(tmp_path / "a.json")
    assert AutoscaleConfig.load(tmp_path / "a.json") == config
    assert AutoscaleConfig.uniform(3).stages == (StagePolicy(),) * 3
    (tmp_path / "b.json").write_text('{"format": "layerline.autoscale", "format_version": 9}')
    with pytest.raises(FormatError, match="version 1"):
        AutoscaleConfig.load(tmp_path / "b.json")
