"""Data pipeline: packing never leaks documents, order is a function of the seed, a restored
iterator continues exactly, process shards are disjoint and cover each global batch, and bad
inputs give clear errors."""
import json
import os
import sys

import numpy as np
import pytest

from efficient_lm.data import (ByteTokenizer, CharTokenizer, Data, DataConfig, DataError,
                               HFTokenizer, MQARSource, PackedSource, concat_documents,
                               host_batches, read_documents)

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                       "data"))
SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare.txt")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} is absent")


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  # document d is made only of the token value d + 1, so any leak is visible
  return [np.full(rng.integers(1, 30), d + 1, np.int32) for d in range(n)]


def test_packing_never_leaks_documents():
  docs = _docs()
  tokens, starts = concat_documents(docs)
  src = PackedSource(tokens, starts, seq_len=16)
  assert len(src) == (tokens.size - 1) // 16
  for i in range(len(src)):
    ex = src[i]
    seg, inp, tgt, mask = ex["segment_ids"], ex["inputs"], ex["targets"], ex["loss_mask"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    # one document per segment id, and a different one for each id
    for s in np.unique(seg):
      assert len(np.unique(inp[seg == s])) == 1
    assert len(np.unique(inp)) == len(np.unique(seg))
    # a counted target always comes from the input's own document
    np.testing.assert_array_equal(tgt[mask > 0], inp[mask > 0])
    # and every target that stays within the document is counted
    np.testing.assert_array_equal(mask > 0, tgt == inp)
    # windows tile the stream: inputs/targets shifted by one
    np.testing.assert_array_equal(inp, tokens[i * 16:(i + 1) * 16])
    np.testing.assert_array_equal(tgt, tokens[i * 16 + 1:(i + 1) * 16 + 1])


def test_packing_with_eos_keeps_eos_in_its_document():
  tokens, starts = concat_documents([np.array([5, 6, 7]), np.array([8, 9])], eos_id=0)
  np.testing.assert_array_equal(tokens, [5, 6, 7, 0, 8, 9, 0])
  ex = PackedSource(tokens, starts, seq_len=6)[0]
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 0, 1, 1])  # 0 -> 8 is not learned


def _stream(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _src(n_docs=200):
  tokens, starts = concat_documents(_docs(n_docs))
  return PackedSource(tokens, starts, seq_len=8)


def test_order_is_deterministic_from_seed():
  src = _src()
  a = _stream(host_batches(src, 4, 0, 1, seed=3), 30)
  b = _stream(host_batches(src, 4, 0, 1, seed=3), 30)
  c = _stream(host_batches(src, 4, 0, 1, seed=4), 30)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))
  # the stream runs over epochs, each a permutation of the source, reshuffled per epoch
  small = _src(12)
  n = len(small)
  rows = np.concatenate([b["inputs"] for b in _stream(host_batches(small, 1, 0, 1, seed=3), 2 * n)])
  want = sorted(tuple(small[i]["inputs"]) for i in range(n))
  assert sorted(map(tuple, rows[:n])) == want and sorted(map(tuple, rows[n:])) == want
  assert not np.array_equal(rows[:n], rows[n:])


def test_restored_iterator_yields_identical_batches():
  src = _src(30)
  it = iter(host_batches(src, 4, 0, 1, seed=1, num_threads=2))
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(25)]  # crosses an epoch boundary (len(src)/4 batches/epoch)
  assert len(src) // 4 < 32
  it2 = iter(host_batches(src, 4, 0, 1, seed=1, num_threads=2))
  it2.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
  got = [next(it2) for _ in range(25)]
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("procs", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(procs):
  src = _src()
  full = _stream(host_batches(src, 8, 0, 1, seed=5), 12)
  parts = [_stream(host_batches(src, 8, p, procs, seed=5), 12) for p in range(procs)]
  for b in range(12):
    rows = np.concatenate([parts[p][b]["inputs"] for p in range(procs)])
    np.testing.assert_array_equal(rows, full[b]["inputs"])  # same rows in the same order
    assert all(parts[p][b]["inputs"].shape[0] == 8 // procs for p in range(procs))


def test_mqar_examples():
  src = MQARSource(vocab_size=512, seq_len=128, num_kv_pairs=16, seed=0)
  ex = src[3]
  np.testing.assert_array_equal(ex["inputs"], MQARSource(vocab_size=512, seq_len=128,
                                                          num_kv_pairs=16, seed=0)[3]["inputs"])
  assert not np.array_equal(ex["inputs"], src[4]["inputs"])
  inp, tgt, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  keys, values = inp[0:32:2], inp[1:32:2]
  assert np.all(keys < 256) and np.all(values >= 256)
  assert mask.sum() == 16
  kv = dict(zip(keys.tolist(), values.tolist()))
  for t in np.nonzero(mask)[0]:
    assert t >= 32 and kv[int(inp[t])] == tgt[t]  # each query is a key; its target its value
  ev = MQARSource(vocab_size=512, seq_len=128, num_kv_pairs=16, seed=0, split=1)[3]
  assert not np.array_equal(ev["inputs"], ex["inputs"])


def test_tokenizers_round_trip():
  text = "Hello, wörld!\nsecond line"
  b = ByteTokenizer()
  assert b.decode(b.encode(text)) == text
  c = CharTokenizer.from_text(text)
  assert c.vocab_size == len(set(text)) and c.decode(c.encode(text)) == text
  with pytest.raises(ValueError, match="not in the character vocabulary"):
    c.encode("Z")


@needs_shared
def test_hf_tokenizer_and_wikitext():
  tok = HFTokenizer(os.path.join(SHARED, "gpt-neox-20b.tokenizer.json"))
  assert tok.vocab_size > 50000 and tok.eos_id == 0
  assert tok.decode(tok.encode("hello world")) == "hello world"
  docs = read_documents("wikitext", os.path.join(SHARED, "wikitext2.valid.txt"))
  assert len(docs) == 60 and all(d.lstrip().startswith("= ") for d in docs)


@needs_shared
def test_shakespeare_chars_split():
  d = Data(DataConfig(source="text", path=SHAKESPEARE, tokenizer="chars", seq_len=64))
  assert d.vocab_size == 65
  n = d.num_train_tokens + len(d.eval_source) * 64
  assert abs(d.num_train_tokens / 1115394 - 0.9) < 1e-3 and n <= 1115394


def test_jsonl_source(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text("\n".join(json.dumps({"text": t}) for t in ["abc" * 20, "xyz" * 30, "q" * 50]))
  d = Data(DataConfig(source="jsonl", path=str(p), tokenizer="bytes", seq_len=16,
                      eval_fraction=0.2))
  assert len(d.train_source) > 0 and len(d.eval_source) > 0
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(DataError, match=r"b.jsonl:2: .*'text'"):
    read_documents("jsonl", str(bad))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  p = tmp_path / "x.parquet"
  p.write_bytes(b"PAR1")
  with pytest.raises(DataError, match="pip install pyarrow"):
    read_documents("parquet", str(p))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_parquet_and_arrow_sources(tmp_path, suffix):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  texts = ["first document " * 5, "", "second one " * 7, "third " * 9]
  table = pa.table({"text": texts, "id": list(range(len(texts)))})
  path = str(tmp_path / f"docs{suffix}")
  if suffix == ".parquet":
    pq.write_table(table, path)
  else:
    with pa.ipc.new_file(path, table.schema) as writer:
      writer.write_table(table)
  assert read_documents("parquet" if suffix == ".parquet" else "arrow", path) == [t for t in texts if t]
  d = Data(DataConfig(source="parquet" if suffix == ".parquet" else "arrow", path=path,
                      tokenizer="bytes", seq_len=8, eval_fraction=0.25))
  assert len(d.train_source) > 0 and len(d.eval_source) > 0
  with pytest.raises(DataError, match="no column 'body'"):
    read_documents("parquet" if suffix == ".parquet" else "arrow", path, field="body")


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(DataError, match="not found"):
    Data(DataConfig(source="text", path=str(tmp_path / "missing.txt")))
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DataError, match="empty"):
    Data(DataConfig(source="text", path=str(empty)))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 100)
  with pytest.raises(DataError, match=r"not valid UTF-8: byte 0xe9 at offset 3 \(line 1\)"):
    Data(DataConfig(source="text", path=str(latin)))
  short = tmp_path / "short.txt"
  short.write_text("tiny")
  with pytest.raises(DataError, match="fewer than one sequence"):
    Data(DataConfig(source="text", path=str(short), seq_len=64))
  with pytest.raises(DataError, match="unknown data.source"):
    Data(DataConfig(source="csv", path=str(short)))
