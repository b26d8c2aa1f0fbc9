"""The device mesh of tensor and context parallelism: where each rank sits, who reads which pairs, whose
metrics count, the gradient norm over several meshes, and the mistakes in its keys (one line, exit 2)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_cli_errors import assert_one_line, base_args

from preftune.cli import main
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.parallel import DistInfo, clip_grad_norm


@pytest.mark.parametrize("world, tp, cp", [(8, 2, 2), (4, 2, 1), (4, 1, 2), (6, 3, 1), (2, 1, 1)])
def test_ranks_sit_where_the_mesh_puts_them(world, tp, cp):
    """``DistInfo``'s (dp, cp, tp) coordinates are those of ``init_device_mesh``'s row-major layout, and each
    data-parallel group (its C x T ranks) has one metrics leader."""
    shape = (world // (tp * cp), cp, tp)
    layout = torch.arange(world).reshape(shape)  # the rank at each mesh coordinate, as DeviceMesh lays them
    leaders = []
    for dp_rank, cp_rank, tp_rank in itertools.product(*map(range, shape)):
        info = DistInfo(
            rank=int(layout[dp_rank, cp_rank, tp_rank]),
            world_size=world,
            tensor_parallel=tp,
            context_parallel=cp,
        )
        assert (info.dp_rank, info.cp_rank, info.tp_rank) == (dp_rank, cp_rank, tp_rank)
        assert info.data_parallel == shape[0] and info.gradient_ranks == shape[0] * cp
        if info.is_data_leader:
            leaders.append(dp_rank)
    assert leaders == list(range(shape[0]))


def test_a_data_parallel_group_reads_the_same_pairs():
    """Every tensor- and context-parallel rank of a group gets its group's share; the groups' shares are the
    global batch, each pair once."""
    world, tp, cp = 8, 2, 2
    shares = {}
    for rank in range(world):
        info = DistInfo(rank=rank, world_size=world, tensor_parallel=tp, context_parallel=cp)
        sampler = GlobalBatchSampler(40, 8, seed=3, rank=info.dp_rank, world_size=info.data_parallel)
        shares[rank] = (info.dp_rank, next(iter(sampler)))
    by_group = {}
    for dp_rank, share in shares.values():
        assert by_group.setdefault(dp_rank, share) == share
    whole = next(iter(GlobalBatchSampler(40, 8, seed=3)))
    assert sorted(by_group[0] + by_group[1]) == sorted(whole)


def test_clip_grad_norm_is_torch_on_one_mesh():
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 3)),
        torch.nn.Parameter(torch.randn(4)),
        torch.nn.Parameter(torch.randn(2)),
    ]
    for p in params[:2]:
        p.grad = torch.randn_like(p) * 3
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, t in zip(params, twins, strict=True):
        t.grad = None if p.grad is None else p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.5).item()
    assert clip_grad_norm(params, 1.5) == pytest.approx(expected, rel=1e-6)
    for p, t in zip(params[:2], twins[:2], strict=True):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=0)
    hand = (params[0].grad.square().sum() + params[1].grad.square().sum()).sqrt()
    assert hand.item() == pytest.approx(1.5, rel=1e-5)  # clipped to max_norm
    assert clip_grad_norm(params, float("inf")) == pytest.approx(hand.item(), rel=1e-6)  # measured only


def test_mesh_mistakes_are_one_line(tmp_path, tiny_model_dir, pair_files, capsys, monkeypatch):
    """Sizes that do not divide the ranks launched, a strategy that cannot shard over the mesh, context
    parallelism without packed rows, online training: one line, exit 2, before anything loads."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = base_args(tiny_model_dir("llama"), pair_files, tmp_path / "out")
    fsdp2 = "distributed.strategy=fsdp2"
    cases = {
        1: [
            (
                [fsdp2, "distributed.tensor_parallel=2"],
                ("= 2 ranks per data-parallel group", "the 1 rank(s)"),
            ),
        ],
        4: [
            (
                [fsdp2, "distributed.tensor_parallel=3"],
                ("does not divide the 4 rank(s)", "--nproc-per-node=3"),
            ),
            (
                [fsdp2, "distributed.tensor_parallel=2", "distributed.context_parallel=0"],
                ("distributed.context_parallel=0", ">= 1"),
            ),
            (["distributed.tensor_parallel=2"], ("needs distributed.strategy=fsdp2", "not ddp")),
            ([fsdp2, "distributed.context_parallel=2"], ("splits packed rows", "data.packing=true")),
            ([fsdp2, "distributed.tensor_parallel=2", "online.enabled=true"], ("online.enabled=true",)),
            # the batch divides over 2 data-parallel groups of 2, not over 4 ranks' micro-batches
            ([fsdp2, "distributed.tensor_parallel=2", "data.global_batch_size=12"], ("multiple of 8",)),
        ],
    }
    capsys.readouterr()
    for world, mistakes in cases.items():
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for overrides, expected in mistakes:
            code = main(["train", "--config", str(config), *base, *overrides])
            captured = capsys.readouterr()
            assert code == 2, (overrides, captured.err)
            assert_one_line(captured.err, *expected)
