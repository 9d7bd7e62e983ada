"""Epoch order from (seed, epoch) and the same multi-scale size on every DDP rank."""

from pipeline.data.samplers import MultiScaleBatchSampler, ShardedSampler


def _batches(rank: int, world: int, epoch: int, seed: int = 3) -> list[list[tuple[int, int]]]:
    sampler = ShardedSampler(50, shuffle=True, seed=seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    return list(MultiScaleBatchSampler(sampler, batch_size=4, sizes=[64, 96, 128], every=2, drop_last=True))


def test_every_rank_gets_the_same_size_at_each_step_and_disjoint_samples():
    rank0, rank1 = _batches(0, 2, epoch=1), _batches(1, 2, epoch=1)
    assert len(rank0) == len(rank1) == 25 // 4
    assert [b[0][1] for b in rank0] == [b[0][1] for b in rank1]
    assert all(len({size for _, size in batch}) == 1 for batch in rank0)
    seen0 = {i for b in rank0 for i, _ in b}
    seen1 = {i for b in rank1 for i, _ in b}
    assert not seen0 & seen1


def test_size_changes_only_every_k_batches_and_uses_several_sizes():
    sizes = [b[0][1] for b in _batches(0, 1, epoch=0)]
    assert all(sizes[i] == sizes[i + 1] for i in range(0, len(sizes) - 1, 2))
    assert len({s for e in range(4) for s in (b[0][1] for b in _batches(0, 1, epoch=e))}) > 1


def test_order_is_a_function_of_seed_and_epoch():
    assert _batches(0, 1, epoch=2) == _batches(0, 1, epoch=2)
    assert _batches(0, 1, epoch=2) != _batches(0, 1, epoch=3)
    assert _batches(0, 1, epoch=2, seed=4) != _batches(0, 1, epoch=2)


def test_validation_sharding_scores_each_image_once():
    shards = [list(ShardedSampler(7, shuffle=False, seed=0, rank=r, world_size=2, pad=False)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))


def test_len_matches_the_indices_it_yields():
    for size, world, pad in [(7, 2, False), (7, 2, True), (1, 4, True), (0, 2, True), (50, 3, False)]:
        for rank in range(world):
            sampler = ShardedSampler(size, shuffle=True, seed=0, rank=rank, world_size=world, pad=pad)
            assert len(sampler) == len(list(sampler))
    assert len(list(ShardedSampler(1, shuffle=False, seed=0, rank=3, world_size=4))) == 1  # padded, not empty
