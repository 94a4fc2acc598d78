"""Workers prove they draw the same logical batches: the comparison, without processes.

`cluster.check_workers_agree` digests what decides the batches, reduces the
digests over the job (bitwise AND and OR: equal exactly when every worker's
digest is) and lets `cluster.refusal` compare them. Here two (or three)
"workers" are two pipelines built in this process, and the reduction is
done by hand; tests/multiworker_test.py runs the real collective on two
worker processes.
"""

import functools
import operator

import numpy as np
import pytest

import conftest
import tf_dpfair as dpf
from tf_dpfair import workers as cluster
from tf_dpfair.data import pipeline as data
from tf_dpfair.privacy import input_sampling as feeding

SEED = 2**61 + 123_456_789  # a secret-looking seed that must never be shown
OTHER_SEED = 987_654_321_987


def config(**changes):
    settings = dict(l2_norm_clip=1.0, noise_multiplier=1.0,
                    expected_batch_size=8, microbatch_size=4, seed=7)
    settings.update(changes)
    return dpf.DPConfig(**settings)


def worker(*, seed=SEED, num_examples=48, batch=8, start_step=0,
           dp_config=None, num_replicas=2):
    """One worker's `AgreementItem`s, from a pipeline built here."""
    rng = np.random.default_rng(0)
    source = data.ExampleSource.from_arrays(
        rng.uniform(size=(num_examples, 4, 4, 1)).astype(np.float32),
        rng.integers(0, 2, num_examples))
    train = data.make_train_dataset(
        source, expected_batch_size=batch, seed=seed, microbatch_size=4,
        num_replicas=num_replicas, start_step=start_step)
    tag = feeding.pipeline_tag(train.dataset)
    return cluster.agreement_items(tag, train.dataset.element_spec,
                                   dp_config or config(expected_batch_size=batch))


def digests(items):
    return [int(item.digest, 16) for item in items]


def and_or(*workers):
    """The reduction `check_workers_agree` gets from its all-reduce."""
    columns = list(zip(*(digests(items) for items in workers)))
    return ([functools.reduce(operator.and_, c) for c in columns],
            [functools.reduce(operator.or_, c) for c in columns])


def min_max(*workers):
    columns = list(zip(*(digests(items) for items in workers)))
    return [min(c) for c in columns], [max(c) for c in columns]


def refusals(*workers):
    """The message of every worker, for both kinds of reduction."""
    found = []
    for reduce in (and_or, min_max):
        low, high = reduce(*workers)
        found += [cluster.refusal(items, low, high, len(workers))
                  for items in workers]
    return found


def the_refusal(*workers):
    """The one message all workers raise (it must be the same everywhere)."""
    messages = refusals(*workers)
    assert messages[0] is not None
    assert all(message == messages[0] for message in messages)
    return messages[0]


def assert_no_secret(message):
    for secret in (SEED, OTHER_SEED):
        assert str(secret) not in message
        assert f"{secret:x}" not in message
        assert cluster.seed_digest(secret) not in message


def test_workers_with_the_same_pipeline_agree():
    assert refusals(worker(), worker()) == [None] * 4
    assert refusals(worker(), worker(), worker()) == [None] * 6


def test_noise_seeds_may_differ_only_the_chief_draws_noise():
    # DPConfig(seed=None) draws a fresh noise seed in every process.
    assert refusals(worker(dp_config=config(seed=None)),
                    worker(dp_config=config(seed=None))) == [None] * 4


def test_a_different_sampling_seed_is_refused_with_share_from_chief():
    message = the_refusal(worker(seed=SEED), worker(seed=OTHER_SEED))
    assert message.startswith(
        "The 2 workers of this job do not agree on what decides the logical "
        "batches: they differ in the sampling seed.")
    assert "tf_dpfair.workers.share_from_chief(strategy, secrets.randbits(62))" in message
    assert "sensitivity up to 2C" in message
    assert "Refused on every worker before the first update" in message
    assert "sampling spec" not in message and "DPConfig" not in message
    assert_no_secret(message)


def test_one_worker_of_three_with_its_own_seed_is_refused_by_all():
    message = the_refusal(worker(), worker(seed=OTHER_SEED), worker())
    assert message.startswith("The 3 workers of this job do not agree")
    assert "the sampling seed" in message
    assert_no_secret(message)


def test_a_different_number_of_examples_names_the_spec():
    message = the_refusal(worker(), worker(num_examples=47))
    assert "the sampling spec (num_examples, sampling_probability" in message
    assert "the training data (N and the shapes and dtypes of its batches)" in message
    assert "the sampling seed" not in message
    assert ("the same tf_dpfair.data.make_train_dataset arguments (the same "
            "ExampleSource, expected_batch_size") in message
    assert "share_from_chief" not in message
    assert_no_secret(message)


def test_a_different_batch_names_the_spec_and_the_dp_config():
    message = the_refusal(worker(), worker(batch=12))
    assert "the sampling spec (expected_batch_size, sampling_probability" in message
    assert "the DPConfig (apart from its noise seed)" in message
    assert "give every worker the same DPConfig" in message
    assert_no_secret(message)


def test_a_different_replica_count_names_num_replicas():
    message = the_refusal(worker(num_replicas=2), worker(num_replicas=4))
    assert "num_replicas" in message
    assert "num_replicas=strategy.num_replicas_in_sync" in message


def test_a_different_start_step_names_the_start():
    message = the_refusal(worker(start_step=0), worker(start_step=3))
    assert "they differ in the pipeline's start (start_step)." in message
    assert "start_step=model.update_count" in message


def test_a_different_clip_norm_names_the_dp_config():
    message = the_refusal(worker(), worker(dp_config=config(l2_norm_clip=2.0)))
    assert "they differ in the DPConfig (apart from its noise seed)." in message


def test_several_differences_are_all_named_with_their_fixes():
    message = the_refusal(worker(), worker(seed=OTHER_SEED, start_step=2))
    assert "they differ in the sampling seed; the pipeline's start (start_step)." in message
    assert "share_from_chief" in message and "start_step=model.update_count" in message
    assert_no_secret(message)


def test_a_pipeline_without_a_seed_digest_is_refused():
    rng = np.random.default_rng(0)
    source = data.ExampleSource.from_arrays(
        rng.uniform(size=(48, 4, 4, 1)).astype(np.float32), rng.integers(0, 2, 48))
    train = data.make_train_dataset(source, expected_batch_size=8, seed=SEED)
    # Tagged by hand, as a pipeline the package did not build would be.
    tag = feeding.pipeline_tag(feeding.tag_pipeline(
        train.dataset.map(lambda *e: e), train.spec, 0, None))
    assert tag.seed_digest is None
    items = cluster.agreement_items(tag, train.dataset.element_spec,
                                    config())
    low, high = and_or(items, items)
    assert "records no digest of its sampling seed" in cluster.refusal(
        items, low, high, 2)
    # Beside a worker that has one, it is a seed disagreement.
    assert "the sampling seed" in the_refusal(items, worker(num_replicas=1))


def test_reductions_of_another_length_are_an_error():
    items = worker()
    with pytest.raises(ValueError, match=r"16 items but 15 and 16 reduced digests"):
        cluster.refusal(items, digests(items)[1:], digests(items), 2)


def test_the_tag_holds_a_digest_of_the_seed_never_the_seed():
    rng = np.random.default_rng(0)
    source = data.ExampleSource.from_arrays(
        rng.uniform(size=(48, 4, 4, 1)).astype(np.float32), rng.integers(0, 2, 48))
    tag = feeding.pipeline_tag(data.make_train_dataset(
        source, expected_batch_size=8, seed=SEED).dataset)
    assert tag.seed_digest == cluster.seed_digest(SEED)
    assert len(tag.seed_digest) == 16 and int(tag.seed_digest, 16) >= 0
    for shown in (tag.seed_digest, repr(tag), str(tag)):
        assert str(SEED) not in shown and f"{SEED:x}" not in shown
    # Seeds one apart give unrelated digests (about half the 64 bits differ).
    flipped = int(cluster.seed_digest(SEED + 1), 16) ^ int(tag.seed_digest, 16)
    assert 16 <= bin(flipped).count("1") <= 48
    # Keyed and named: not the plain blake2b of the seed, nor another
    # item's digest of the same number.
    import hashlib
    plain = hashlib.blake2b(str(SEED).encode(), digest_size=8).hexdigest()
    assert tag.seed_digest != plain
    assert tag.seed_digest != cluster.digest("start_step", SEED)
    # The same seed gives the same digest in any process (no per-process salt).
    assert cluster.seed_digest(SEED) == cluster.seed_digest(int(str(SEED)))


def test_and_or_over_replicas_of_one_process():
    # The real collective over a 2-replica MirroredStrategy: both replicas
    # send the same digests, so AND and OR both give them back.
    values = [0, 2**64 - 1, int(cluster.seed_digest(SEED), 16), 5]
    low, high = cluster.and_or_over_replicas(conftest.mirrored_strategy(), values)
    assert low == high == values


def test_one_process_is_not_checked():
    # Outside a multi-worker job there is nothing to agree with.
    items_tag = feeding.pipeline_tag(data.make_train_dataset(
        data.ExampleSource.from_arrays(np.zeros((8, 2, 2, 1), np.float32),
                                       np.zeros(8, np.int32)),
        expected_batch_size=4, seed=1).dataset)
    cluster.check_workers_agree(conftest.mirrored_strategy(), items_tag,
                                config(), None)
