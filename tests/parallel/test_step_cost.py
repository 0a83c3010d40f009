"""Per-step collective bytes, FLOPs and HBM bytes from HLO text (`hlo.step_cost`), and the roofline.

The HLO below is written by hand in XLA's printed form: an entry that all-reduces once, then a
while loop (trip count 5, given by `known_trip_count` or, in the second module, only by its
condition `i < 5`) whose body all-gathers f32[8,16] (512 bytes) and runs one dot [8,16]·[16,4]
(2·8·4·16 = 1024 FLOPs) inside a fusion, and a nested loop of 3 trips that reduce-scatters
f32[64] → [16] (256 bytes of operand) on each of its trips.
"""

import pytest

from umv2_jax import hardware
from umv2_jax.parallel import hlo, roofline

MODULE = """\
HloModule step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,4]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%fused_dot (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(f32[8,16]{1,0} %p0, f32[16,4]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner_body (t: (s32[], f32[64])) -> (s32[], f32[64]) {
  %t = (s32[], f32[64]{0}) parameter(0)
  %j = s32[] get-tuple-element((s32[], f32[64]{0}) %t), index=0
  %v = f32[64]{0} get-tuple-element((s32[], f32[64]{0}) %t), index=1
  %rs = f32[16]{0} reduce-scatter(f32[64]{0} %v), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %out = (s32[], f32[64]{0}) tuple(s32[] %j, f32[64]{0} %v)
}

%inner_cond (t: (s32[], f32[64])) -> pred[] {
  %t = (s32[], f32[64]{0}) parameter(0)
  %j = s32[] get-tuple-element((s32[], f32[64]{0}) %t), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %j, s32[] %three), direction=LT
}

%body (s: (s32[], f32[8,16], f32[16,4], f32[64])) -> (s32[], f32[8,16], f32[16,4], f32[64]) {
  %s = (s32[], f32[8,16]{1,0}, f32[16,4]{1,0}, f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%s), index=1
  %w = f32[16,4]{1,0} get-tuple-element(%s), index=2
  %y = f32[64]{0} get-tuple-element(%s), index=3
  %ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %x), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
  %f = f32[8,4]{1,0} fusion(f32[8,16]{1,0} %ag, f32[16,4]{1,0} %w), kind=kOutput, calls=%fused_dot
  %zero = s32[] constant(0)
  %it = (s32[], f32[64]{0}) tuple(s32[] %zero, f32[64]{0} %y)
  %inner = (s32[], f32[64]{0}) while((s32[], f32[64]{0}) %it), condition=%inner_cond, body=%inner_body
  ROOT %r = (s32[], f32[8,16]{1,0}, f32[16,4]{1,0}, f32[64]{0}) tuple(%i, %x, %w, %y)
}

%cond (s: (s32[], f32[8,16], f32[16,4], f32[64])) -> pred[] {
  %s = (s32[], f32[8,16]{1,0}, f32[16,4]{1,0}, f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %five), direction=LT
}

ENTRY %main (x: f32[8,16]) -> f32[8,4] {
  %x = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %w = f32[16,4]{1,0} constant({...})
  %y = f32[64]{0} constant({...})
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}, f32[16,4]{1,0}, f32[64]{0}) tuple(%zero, %ar, %w, %y)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,4]{1,0}, f32[64]{0}) while(%init), condition=%cond, body=%body TRIP
  ROOT %out = f32[8,4]{1,0} constant({...})
}
"""
KNOWN = MODULE.replace(" TRIP", ', backend_config={"known_trip_count":{"n":"5"}}')
INFERRED = MODULE.replace(" TRIP", "")


@pytest.mark.parametrize("text", [KNOWN, INFERRED], ids=["known_trip_count", "condition"])
def test_loop_bodies_count_once_per_trip(text):
    cost = hlo.step_cost(text)
    assert cost.collective_bytes == {
        "all-reduce": 8 * 16 * 4,  # entry: once
        "all-gather": 5 * 8 * 16 * 4,  # outer body: 5 trips
        "reduce-scatter": 5 * 3 * 64 * 4,  # inner body: 3 trips of each of 5
    }
    assert cost.flops == 5 * 2 * 8 * 4 * 16  # the dot inside the fusion, × the outer trips
    assert sorted(cost.trips.values()) == [3, 5] and cost.unknown_trips == ()
    # Bytes per trip of the outer body: all-gather 2·16·4 in + 512 out; the fusion 512 + 256 in,
    # 128 out; the inner loop's reduce-scatter 256 in + 64 out per inner trip.
    outer = (2 * 16 * 4 + 512) + (512 + 256 + 128) + 3 * (256 + 64)
    conditions = (5 + 5 * 3) * (4 + 4 + 1)  # each trip's compare: two s32 in, one pred out
    assert cost.hbm_bytes == 5 * outer + (512 + 512) + conditions  # + the entry's all-reduce


def test_a_loop_without_a_readable_trip_count_counts_once_and_is_named():
    text = INFERRED.replace("direction=LT", "direction=NE")
    cost = hlo.step_cost(text)
    assert set(cost.unknown_trips) == {"loop", "inner"}
    assert cost.collective_bytes["all-gather"] == 8 * 16 * 4


def test_the_same_module_through_the_old_flat_count_misses_the_trips():
    # bytes_moved counts each instruction once: the step_cost totals are what the loops add.
    flat = hlo.bytes_moved(hlo.collectives(KNOWN))
    assert flat["all-gather"] * 5 == hlo.step_cost(KNOWN).collective_bytes["all-gather"]


def test_roofline_terms_bound_and_model_flops():
    chip = hardware.chip("v5p")
    cost = hlo.StepCost(
        collective_bytes={"all-gather": 3e9, "reduce-scatter": 1.5e9},
        flops=4.59e14,
        hbm_bytes=2.765e12,
        trips={},
        unknown_trips=(),
    )
    estimate = roofline.roofline(cost, chip)
    assert estimate.terms["compute"] == pytest.approx(4.59e14 / chip.peak_bf16_flops)  # 1 s
    assert estimate.terms["memory"] == pytest.approx(2.765e12 / chip.hbm_bytes_per_s)  # 1 s
    assert estimate.terms["collectives"] == pytest.approx(4.5e9 / chip.ici_bytes_per_s)
    assert estimate.bound == max(estimate.terms, key=estimate.terms.get)
    assert estimate.seconds == max(estimate.terms.values())
    assert estimate.serial_seconds == pytest.approx(sum(estimate.terms.values()))
    # The accounting's model FLOPs win where the HLO cannot see them (custom calls).
    more = roofline.roofline(cost, chip, model_flops=3 * 4.59e14)
    assert more.terms["compute"] == pytest.approx(3.0 * estimate.terms["compute"])
    assert more.bound == "compute"
    fewer = roofline.roofline(cost, chip, model_flops=1.0)
    assert fewer.flops == cost.flops
