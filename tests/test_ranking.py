"""Class-specific part ranking: prototypes recover known clusters; Eq. 2 exactly; ranks agree; the class-bucketed
candidate store samples, resumes and survives SIGKILL."""

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from part_distill.engine.ranking import deal_classes_to_ranks, fit_prototypes_distributed
from part_distill.modeling.part_candidates import select_part_candidates
from part_distill.modeling.ranker import PartRanker

from _kill_harness import tree_bytes as file_tree

NUM_CLASSES, K, DIM = 3, 8, 16


def _synthetic_candidates(n_per_cluster=40, seed=0):
    """Per class, 8 well separated Gaussian blobs; returns features, classes, true ids, keys."""
    all_centers = np.random.default_rng(1234).normal(scale=6.0, size=(NUM_CLASSES, K, DIM))
    rng = np.random.default_rng(seed)
    feats, classes, truth, keys = [], [], [], []
    for c in range(NUM_CLASSES):
        for j in range(K):
            x = all_centers[c, j] + rng.normal(scale=0.3, size=(n_per_cluster, DIM))
            feats.append(x)
            classes += [c] * n_per_cluster
            truth += [j] * n_per_cluster
    feats = np.concatenate(feats).astype(np.float32)
    n = len(classes)
    perm = rng.permutation(n)
    keys = np.stack([perm, np.zeros(n, int), np.arange(n)], 1)  # image ids in shuffled order
    return feats, np.array(classes), np.array(truth), keys


def _ranker_from(prototypes):
    ranker = PartRanker(NUM_CLASSES, K, DIM)
    for c, centers in prototypes.items():
        ranker.set_class_prototypes(c, centers)
    return ranker


def test_ranking_recovers_known_clusters(tmp_path):
    feats, classes, truth, keys = _synthetic_candidates()
    protos, report = fit_prototypes_distributed(
        feats, classes, np.ones(len(classes)), keys, NUM_CLASSES, K, str(tmp_path), seed=3
    )
    assert report["classes_without_prototypes"] == []
    ranker = _ranker_from(protos)
    # held-out samples of the same blobs
    test_feats, test_classes, test_truth, _ = _synthetic_candidates(n_per_cluster=10, seed=99)
    _, ids, scores = ranker(torch.from_numpy(test_feats), torch.from_numpy(test_classes))
    for c in range(NUM_CLASSES):
        sel = test_classes == c
        assert adjusted_rand_score(test_truth[sel], ids.numpy()[sel]) >= 0.95
    assert (scores > 0.5).float().mean() > 0.9  # points sit near their own prototype


def test_ranker_matches_equation_2():
    torch.manual_seed(0)
    ranker = PartRanker(2, 4, 5)
    ranker.set_class_prototypes(0, torch.randn(4, 5))
    ranker.set_class_prototypes(1, torch.randn(3, 5))  # class 1 has only 3 prototypes
    f = torch.randn(6, 5)
    cls = torch.tensor([0, 1, 0, 1, -1, 1])
    probs, ids, scores = ranker(f, cls)
    for i in range(6):
        c = int(cls[i])
        if c < 0:
            assert ids[i] == -1 and scores[i] == 0 and probs[i].abs().sum() == 0
            continue
        nk = 4 if c == 0 else 3
        d = np.linalg.norm(f[i].numpy()[None] - ranker.prototypes[c, :nk].numpy(), axis=1)
        r = np.exp(-d) / np.exp(-d).sum()
        np.testing.assert_allclose(probs[i, :nk].numpy(), r, rtol=1e-5)
        assert probs[i, nk:].abs().sum() == 0
        assert ids[i] == int(np.argmax(r))
        np.testing.assert_allclose(float(scores[i]), r.max(), rtol=1e-5)


def test_class_without_candidates_is_reported(tmp_path):
    feats, classes, _, keys = _synthetic_candidates()
    keep = classes != 2
    protos, report = fit_prototypes_distributed(
        feats[keep], classes[keep], np.ones(keep.sum()), keys[keep], NUM_CLASSES, K, str(tmp_path)
    )
    assert report["classes_without_prototypes"] == [2]
    ranker = _ranker_from(protos)
    _, ids, _ = ranker(torch.from_numpy(feats[:3]), torch.tensor([2, 2, 0]))
    assert ids[0] == -1 and ids[1] == -1 and ids[2] >= 0


def test_deal_classes_balances_load():
    counts = [100, 90, 10, 10, 5, 0]
    owner = deal_classes_to_ranks(counts, 2)
    load = [sum(counts[c] for c in owner if owner[c] == r) for r in range(2)]
    assert sorted(load) == [105, 110]  # optimal here: {100, 5} vs {90, 10, 10}


def _ranking_worker(out_dir, result_path):
    from detectron2.utils import comm

    feats, classes, _, keys = _synthetic_candidates()
    rank, world = comm.get_rank(), comm.get_world_size()
    # shard candidates by image id across ranks, as the stage runner does
    sel = keys[:, 0] % world == rank
    # a sample cap below the class sizes (320): the sample, too, must not depend on the world size
    protos, _ = fit_prototypes_distributed(
        feats[sel], classes[sel], np.ones(sel.sum()), keys[sel], NUM_CLASSES, K, out_dir, seed=1, max_samples=100
    )
    if rank == 0:
        torch.save({c: v for c, v in protos.items()}, result_path)


def test_two_process_gloo_equals_one_process(tmp_path):
    from detectron2.engine import launch

    one = str(tmp_path / "one.pt")
    two = str(tmp_path / "two.pt")
    _ranking_worker(str(tmp_path / "single"), one)
    launch(_ranking_worker, 2, dist_url="auto", args=(str(tmp_path / "dist"), two))
    a, b = torch.load(one), torch.load(two)
    assert sorted(a) == sorted(b) == list(range(NUM_CLASSES))
    for c in a:
        torch.testing.assert_close(a[c], b[c], rtol=0, atol=0)


def test_candidates_match_brute_force():
    g = torch.Generator().manual_seed(0)
    Q, H, W = 6, 12, 10
    probs = torch.rand(Q, H, W, generator=g)
    scores = torch.tensor([0.9, 0.2, 0.5, 0.35, 0.8, 0.31])
    obj = torch.zeros(H, W, dtype=torch.bool)
    obj[2:11, 1:9] = True
    ids, won, ratio = select_part_candidates(probs, scores, obj, 0.3, 0.05)
    area = obj.sum().item()
    expected_ids = []
    wins = np.zeros(Q)
    owner = np.full((H, W), -1)
    for y in range(H):
        for x in range(W):
            if obj[y, x]:
                q = int(np.argmax([probs[i, y, x] * scores[i] for i in range(Q)]))
                wins[q] += 1
                owner[y, x] = q
    for q in range(Q):
        if scores[q] > 0.3 and wins[q] / area >= 0.05:
            expected_ids.append(q)
    assert ids.tolist() == expected_ids
    for j, q in enumerate(expected_ids):
        assert torch.equal(won[j], torch.from_numpy(owner == q))
        assert abs(ratio[j].item() - wins[q] / area) < 1e-6


# ---------------------------------------------------------------- class-bucketed store, sample cap, resume
def _keyed(keys):
    return {tuple(k): i for i, k in enumerate(np.asarray(keys).tolist())}


def test_bucketed_batched_fit_matches_per_class_fit(tmp_path):
    """Classes clustered together in a bucket batch == each class alone (B=1) on its key-ordered candidates."""
    from part_distill.engine.ranking import fit_class_prototypes

    feats, classes, _, keys = _synthetic_candidates(n_per_cluster=12)
    w = np.random.default_rng(0).uniform(0.2, 1.0, len(classes))
    protos, _ = fit_prototypes_distributed(feats, classes, w, keys, NUM_CLASSES, K, str(tmp_path), seed=4,
                                           num_buckets=1, feature_dtype="float32")
    for c in range(NUM_CLASSES):
        sel = np.flatnonzero(classes == c)
        sel = sel[np.lexsort(keys[sel].T[::-1])]
        ref = fit_class_prototypes(feats[sel], w[sel], K, 4 + c)
        torch.testing.assert_close(protos[c], ref, rtol=0, atol=1e-5)


def test_sample_cap_is_the_smallest_key_hashes_for_any_chunking(tmp_path):
    """A class above MAX_SAMPLES is fitted on the cap candidates of smallest seeded key hash (brute force),
    whatever the chunking of the store; classes below the cap use all their candidates."""
    from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks
    from part_distill.engine.ranking import fit_class_prototypes, fit_store_prototypes, sample_priority
    from part_distill.mining.store import config_hash

    feats, classes, _, keys = _synthetic_candidates(n_per_cluster=30)  # 240 per class
    w = np.random.default_rng(1).uniform(0.2, 1.0, len(classes))
    cap, seed = 64, 11
    results = []
    for n_chunks in (1, 5):
        store = CandidateStore(str(tmp_path / f"c{n_chunks}" / "candidates"), 2, "float32")
        info = {"config": {"n": n_chunks}}
        info["config_hash"] = config_hash(info)
        parts = np.array_split(np.random.default_rng(2).permutation(len(classes)), n_chunks)
        write_candidate_chunks(store, info, n_chunks, lambda c: (feats[parts[c]], classes[parts[c]], w[parts[c]],
                                                                 keys[parts[c]]), NUM_CLASSES)
        results.append(fit_store_prototypes(store, n_chunks, NUM_CLASSES, K, str(tmp_path / f"c{n_chunks}"),
                                            seed=seed, max_samples=cap))
    (a, rep_a), (b, _) = results
    assert rep_a["classes_fitted_on_a_sample"] == NUM_CLASSES
    prio = sample_priority(keys, seed)
    for c in range(NUM_CLASSES):
        torch.testing.assert_close(a[c], b[c], rtol=0, atol=0)
        sel = np.flatnonzero(classes == c)
        brute = sorted(sel.tolist(), key=lambda i: (int(prio[i]), *keys[i].tolist()))[:cap]
        brute = np.array(sorted(brute, key=lambda i: tuple(keys[i].tolist())))
        ref = fit_class_prototypes(feats[brute], w[brute], K, seed + c)
        torch.testing.assert_close(a[c], ref, rtol=0, atol=1e-5)
        # every candidate is assigned (streamed), not only the sample
        assert sum(rep_a["cluster_sizes"][str(c)]) == len(sel)


def test_cluster_sizes_and_fp16_match_brute_force(tmp_path):
    feats, classes, _, keys = _synthetic_candidates(n_per_cluster=20)
    protos, report = fit_prototypes_distributed(feats, classes, np.ones(len(classes)), keys, NUM_CLASSES, K,
                                                str(tmp_path), seed=2, max_samples=50)
    x16 = feats.astype(np.float16).astype(np.float32)  # what the store holds
    for c in range(NUM_CLASSES):
        sel = classes == c
        d = ((x16[sel][:, None] - protos[c].numpy()[None]) ** 2).sum(-1)
        assert report["cluster_sizes"][str(c)] == np.bincount(d.argmin(1), minlength=len(protos[c])).tolist()
    # fp16 storage vs fp32: same clusters, centers within the fp16 rounding of the features
    p32, _ = fit_prototypes_distributed(feats, classes, np.ones(len(classes)), keys, NUM_CLASSES, K,
                                        str(tmp_path / "f32"), seed=2, max_samples=50, feature_dtype="float32")
    for c in range(NUM_CLASSES):
        err = (protos[c] - p32[c]).abs().max().item()
        assert err < 1e-2 * float(np.abs(feats).max())


def test_class_without_prototype_is_said_loudly(tmp_path, caplog):
    feats, classes, _, keys = _synthetic_candidates()
    keep = classes != 1
    with caplog.at_level("WARNING"):
        _, report = fit_prototypes_distributed(feats[keep], classes[keep], np.ones(keep.sum()), keys[keep],
                                               NUM_CLASSES, K, str(tmp_path))
    assert report["classes_without_prototypes"] == [1]
    assert "NO prototype" in report["warning"] and "[1]" in report["warning"]
    assert any("NO prototype" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def _store_run(root, produce_calls, num_chunks=4):
    from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks
    from part_distill.engine.ranking import fit_store_prototypes
    from part_distill.mining.store import config_hash

    feats, classes, _, keys = _synthetic_candidates(n_per_cluster=10)
    parts = np.array_split(np.arange(len(classes)), num_chunks)

    def produce(c):
        produce_calls.append(c)
        p = parts[c]
        return feats[p], classes[p], np.ones(len(p)), keys[p]

    store = CandidateStore(os.path.join(root, "candidates"), 3, "float16")
    info = {"config": {"test": 1}}
    info["config_hash"] = config_hash(info)
    write_candidate_chunks(store, info, num_chunks, produce, NUM_CLASSES)
    return fit_store_prototypes(store, num_chunks, NUM_CLASSES, K, root, seed=0, max_samples=30)


def test_damaged_and_stale_files_are_named_and_remade(tmp_path, caplog):
    calls = []
    ref, _ = _store_run(str(tmp_path), calls)
    assert calls == [0, 1, 2, 3]
    before = file_tree(tmp_path)
    cand, proto = tmp_path / "candidates", tmp_path / "prototypes"
    with open(cand / "chunk_00002.npy", "r+b") as f:  # truncated chunk
        f.truncate(200)
    (proto / "bucket_0001.npz").write_bytes(b"not a zip")  # damaged bucket
    (cand / ".chunk_00001.npy.abc123.tmp").write_bytes(b"half")  # temp files a kill left
    (proto / ".bucket_0000.npz.xyz.tmp").write_bytes(b"half")
    calls.clear()
    with caplog.at_level("WARNING"):
        again, _ = _store_run(str(tmp_path), calls)
    assert calls == [2]  # only the damaged chunk is collected again
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "chunk_00002.npy" in msgs and "bucket_0001.npz" in msgs
    assert file_tree(tmp_path) == before  # same bytes, no temp file left
    for c in ref:
        torch.testing.assert_close(again[c], ref[c], rtol=0, atol=0)


def test_candidates_of_another_configuration_are_refused(tmp_path):
    from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks
    from part_distill.mining.store import ConfigMismatchError, config_hash

    _store_run(str(tmp_path), [])
    store = CandidateStore(str(tmp_path / "candidates"), 3)
    info = {"config": {"test": 2}}
    info["config_hash"] = config_hash(info)
    with pytest.raises(ConfigMismatchError, match="test"):
        write_candidate_chunks(store, info, 4, None, NUM_CLASSES)


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_files(tmp_path):
    """The ranking (candidate chunks + bucket fits) as a subprocess, SIGKILLed 5 times at random moments
    (a random 0-40 ms after a random one of its next 7 writes) in one directory, then run to the end:
    the files equal an uninterrupted run's byte for byte and no temp file is left."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    driver = os.path.join(root, "tests", "_ranking_kill_driver.py")

    def start(out):
        p = subprocess.Popen([sys.executable, driver, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        return p

    p = start(tmp_path / "ref")
    out, err = p.communicate()
    assert p.returncode == 0 and out.split()[-1] == "done", err
    ref = file_tree(tmp_path / "ref")

    rng = np.random.default_rng(2024)
    runs = [tmp_path / "killed0"]
    kills, launches, in_fit = 0, 0, []
    while kills < 5 and launches < 15:
        launches += 1
        p = start(runs[-1])
        events = int(rng.integers(1, 8))  # of the 10 chunks + 12 buckets the driver writes
        for line in p.stdout:
            events -= line.strip() == "progress"
            if events == 0:
                break
        time.sleep(float(rng.uniform(0.0, 0.04)))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        if p.returncode == -signal.SIGKILL:
            kills += 1
            proto = runs[-1] / "prototypes"
            in_fit.append(os.path.isdir(proto) and bool(os.listdir(proto)))
        else:  # it finished before the kill: go on killing in a fresh directory
            runs.append(tmp_path / f"killed{len(runs)}")
    assert kills >= 5
    assert any(in_fit) and not all(in_fit)  # kills landed while collecting and while fitting
    for run in runs:
        p = start(run)
        _, err = p.communicate()
        assert p.returncode == 0, err
        got = file_tree(run)
        assert not [n for n in got if os.path.basename(n).endswith(".tmp")]
        assert sorted(got) == sorted(ref)
        assert [n for n in got if got[n] != ref[n]] == []


def test_chunk_without_candidates_is_fine(tmp_path):
    """Images without any candidate give an empty chunk; the fit equals the one without that chunk."""
    from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks
    from part_distill.engine.ranking import fit_store_prototypes
    from part_distill.mining.store import config_hash

    feats, classes, _, keys = _synthetic_candidates(n_per_cluster=6)
    out = []
    for chunks in ([np.arange(len(classes))], [np.arange(len(classes)), np.arange(0)]):
        root = tmp_path / str(len(chunks))
        store = CandidateStore(str(root / "candidates"), 2)
        info = {"config": {}}
        info["config_hash"] = config_hash(info)
        def produce(c, chunks=chunks):
            p = chunks[c]
            return feats[p].reshape(-1, DIM), classes[p], np.ones(len(p)), keys[p]

        write_candidate_chunks(store, info, len(chunks), produce, NUM_CLASSES)
        out.append(fit_store_prototypes(store, len(chunks), NUM_CLASSES, K, str(root))[0])
    for c in range(NUM_CLASSES):
        torch.testing.assert_close(out[0][c], out[1][c], rtol=0, atol=0)
