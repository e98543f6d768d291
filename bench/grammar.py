"""Grammar engines for constrained decoding, measured on SmolLM2's tokenizer: xgrammar and llguidance.

    python bench/grammar.py            # both engines, one child process each; < 2 minutes
    python bench/grammar.py --quick    # fewer repetitions

For each engine, in a fresh child process (so import time and memory are its own):

    import           seconds and resident memory (RSS) after `import ENGINE`
    tokenizer info   seconds to build the engine's view of the 49,152-token vocabulary
    compile          seconds per constraint, cold (first time) and warm (the engine's own cache)
    mask             per generated token: fill the allowed-token bitmask, then accept the token,
                     over JSON texts written as a model writes them (compact and indented)
    batch            one decode step of 64 constrained sequences: every bitmask filled, one at a
                     time and with the engine's multi-threaded batch call
    memory           RSS after all of the above
    features         what each engine covers, each shown by a check that can fail

The outputs are tokenized with the model's own tokenizer (`Tokenizer.encode`), and every token
is checked against the mask filled before it, so a wrong mask fails the run. The table goes to
stdout, the full results to bench/results/grammar.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, environment, fmt, summarize, table, write_json  # noqa: E402

ENGINES = ("xgrammar", "llguidance")
BATCH = 64  # sequences in the batch measurement (the issue's concurrency)

# ---- workload: constraints and texts a model writes under them ----------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,}$"},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
    "required": ["name", "age", "address"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "order_id": {"type": "string"}, "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
    "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
        "price": {"type": "number", "minimum": 0, "maximum": 10000}},
        "required": ["sku", "quantity", "price"], "additionalProperties": False}},
    "express": {"type": "boolean"}},
    "required": ["order_id", "status", "items", "express"], "additionalProperties": False}
WEATHER_ARGS = {"type": "object", "properties": {
    "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1,
                                                                        "maximum": 14}},
    "required": ["location", "unit"], "additionalProperties": False}
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    "required": ["label", "children"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
REVIEW = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 3, "maxLength": 80},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "sentiment": {"anyOf": [{"const": "positive"}, {"const": "negative"}, {"const": "mixed"}]},
    "summary": {"type": "string"}, "pros": {"type": "array", "items": {"type": "string"}},
    "cons": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "rating", "sentiment", "summary", "pros", "cons"], "additionalProperties": False}

PERSON_OUT = [
    {"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.org",
     "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
     "tags": ["mathematician", "writer"]},
    {"name": "Grace Hopper", "age": 85, "address": {"street": "1 Navy Yard", "city": "Arlington", "zip": "22202"}},
]
ORDER_OUT = [
    {"order_id": "A-10023", "status": "shipped", "items": [
        {"sku": "KB-101", "quantity": 2, "price": 49.99}, {"sku": "MS-7", "quantity": 1, "price": 19.5}],
     "express": False},
    {"order_id": "Z9", "status": "pending", "items": [{"sku": "TV-55-OLED", "quantity": 1, "price": 1299}],
     "express": True},
]
WEATHER_OUT = [{"location": "Paris, France", "unit": "celsius", "days": 3},
               {"location": "San Francisco, USA", "unit": "fahrenheit"}]
TREE_OUT = [{"label": "root", "children": [{"label": "a", "children": [{"label": "a1", "children": []}]},
                                           {"label": "b", "children": []}]}]
REVIEW_OUT = [{"title": "Solid laptop for the price", "rating": 4, "sentiment": "positive",
               "summary": "Fast, quiet and light; the screen could be brighter and the speakers are thin.",
               "pros": ["battery life", "keyboard", "weight"], "cons": ["dim screen", "speakers"]}]


def _texts(objs: list) -> list[str]:
    """Each object as a model writes JSON: on one line with spaces, and indented by 2."""
    return [json.dumps(o, ensure_ascii=False) for o in objs] + [json.dumps(o, indent=2, ensure_ascii=False)
                                                                 for o in objs]


GBNF_ARITH = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= num (("*" | "/") num)*\nnum ::= [0-9]+\n'
CASES = [  # (name, kind, spec, outputs)
    ("json_schema person", "json_schema", PERSON, _texts(PERSON_OUT)),
    ("json_schema order", "json_schema", ORDER, _texts(ORDER_OUT)),
    ("json_schema weather", "json_schema", WEATHER_ARGS, _texts(WEATHER_OUT)),
    ("json_schema tree", "json_schema", TREE, _texts(TREE_OUT)),
    ("json_schema review", "json_schema", REVIEW, _texts(REVIEW_OUT)),
    ("json_object", "json_object", None, _texts(ORDER_OUT + REVIEW_OUT)),
    ("regex phone", "regex", r"\+?[0-9]{1,3} \([0-9]{3}\) [0-9]{3}-[0-9]{4}", ["+1 (415) 555-0132", "44 (020) 794-6000"]),
    ("choice", "choice", ["positive", "negative", "neutral"], ["negative", "neutral"]),
    ("grammar arithmetic (GBNF)", "grammar", GBNF_ARITH, ["12+7*3-40/8", "2*3*4"]),
]


# ---- the engines, behind one small interface ----------------------------------------------------
class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        # Special tokens get no bytes, so grammars never match them as text (xgrammar counts a
        # token with empty bytes as special); EOS stays the stop token.
        vocab = [b"" if i in tok.special_ids else tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self.batcher = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, kind: str, spec):
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(spec), strict_mode=True)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        if kind == "grammar":
            return c.compile_grammar(spec)
        if kind == "lark":
            return c.compile_lark(spec)
        raise ValueError(kind)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask: np.ndarray, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask: np.ndarray) -> None:
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def terminated(self, m) -> bool:
        return m.is_terminated()

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def memory_bytes(self, compiled) -> int:
        return compiled.memory_size_bytes


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance
        import llguidance.numpy as lnp

        self.llg, self.lnp = llguidance, lnp

        class Vocab:  # what llguidance.TokenizerWrapper reads
            eos_token_id = tok.eos_token_id
            bos_token_id = tok.bos_token_id
            tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
            special_token_ids = sorted(tok.special_ids)

            def __call__(self, text):
                return tok.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, kind: str, spec):
        M = self.llg.LLMatcher
        if kind == "json_schema":
            grammar = M.grammar_from_json_schema(spec)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"})
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec))
        elif kind in ("grammar", "lark"):
            grammar = self.llg.grammar_from("gbnf" if kind == "grammar" else "lark", spec)
        else:
            raise ValueError(kind)
        err = M.validate_grammar(grammar, self.tokenizer)
        if err:
            raise ValueError(err)
        # llguidance compiles lazily: the matcher is the compiled form, built per request
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, m, bitmask: np.ndarray, row: int) -> None:
        self.lnp.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, matchers: list, bitmask: np.ndarray) -> None:
        self.lnp.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def terminated(self, m) -> bool:
        return m.is_stopped()

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def memory_bytes(self, compiled) -> int | None:
        return None


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _allowed(bitmask: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


# ---- one engine, in a child process ---------------------------------------------------------------
def measure(engine_name: str, reps: int) -> dict:
    out: dict = {"engine": engine_name}
    rss0 = _rss_mib()
    t = time.perf_counter()
    __import__(engine_name)
    out["import_s"] = time.perf_counter() - t
    out["import_rss_mib"] = _rss_mib() - rss0
    import importlib.metadata

    out["version"] = importlib.metadata.version(engine_name)

    from shardline.coordinator.tokenizer import Tokenizer
    from shardline.model_file import resolve_model_path

    tok = Tokenizer.from_model_path(resolve_model_path("smollm2-135m"))
    vocab = tok.vocab_size
    rss1 = _rss_mib()
    t = time.perf_counter()
    eng = (Xgrammar if engine_name == "xgrammar" else Llguidance)(tok, vocab)
    out["tokenizer_info_s"] = time.perf_counter() - t
    out["tokenizer_info_rss_mib"] = _rss_mib() - rss1
    words = (vocab + 31) // 32
    bitmask = np.zeros((BATCH, words), dtype=np.int32)

    cases, compiled = [], {}
    fill_s, accept_s, num_tokens = [], [], 0
    for name, kind, spec, texts in CASES:
        t = time.perf_counter()
        c = eng.compile(kind, spec)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        eng.compile(kind, spec)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        eng.matcher(c)
        matcher_s = time.perf_counter() - t
        compiled[name] = c
        case_fill = []
        for text in texts:
            ids = tok.encode(text)
            for _ in range(reps):
                m = eng.matcher(c)
                for tid in ids:
                    t0 = time.perf_counter()
                    eng.fill(m, bitmask, 0)
                    t1 = time.perf_counter()
                    if not _allowed(bitmask, 0, tid):
                        raise AssertionError(f"{engine_name} {name}: token {tid} ({tok.token_bytes(tid)!r}) of "
                                             f"{text!r} is not in the mask")
                    if not eng.accept(m, tid):
                        raise AssertionError(f"{engine_name} {name}: token {tid} of {text!r} refused")
                    accept_s.append(time.perf_counter() - t1)
                    case_fill.append(t1 - t0)
                eng.fill(m, bitmask, 0)  # complete: EOS may follow (and nothing else but in the grammar)
                allowed = [i for i in range(vocab) if _allowed(bitmask, 0, i)]
                complete = allowed == [tok.eos_token_id] if kind != "grammar" else tok.eos_token_id in allowed
                if not complete or not eng.accept(m, tok.eos_token_id) or not eng.terminated(m):
                    raise AssertionError(f"{engine_name} {name}: after {text!r}: allowed {allowed[:8]}, "
                                         f"terminated={eng.terminated(m)}")
            num_tokens += len(ids)
        fill_s += case_fill
        cases.append({"name": name, "compile_cold_s": cold, "compile_warm_s": warm, "matcher_s": matcher_s,
                      "memory_bytes": eng.memory_bytes(c), "fill_us": summarize([x * 1e6 for x in case_fill])})
    out["cases"] = cases
    out["fill_us"] = summarize([x * 1e6 for x in fill_s], ps=(50, 99))
    out["accept_us"] = summarize([x * 1e6 for x in accept_s], ps=(50, 99))
    out["tokens_checked"] = num_tokens * reps

    # One decode step of BATCH sequences: the JSON-schema texts round-robin, each sequence at its
    # own point of its text (steps run until the longest ends).
    jobs = [(compiled[name], tok.encode(text)) for name, kind, _, texts in CASES if kind == "json_schema"
            for text in texts]
    seqs = [jobs[i % len(jobs)] for i in range(BATCH)]
    for label, batched in (("one_by_one", False), ("batch_call", True)):
        matchers = [eng.matcher(c) for c, _ in seqs]
        pos = [0] * BATCH
        steps = []
        while True:
            live = [i for i in range(BATCH) if pos[i] < len(seqs[i][1])]
            if not live:
                break
            ms = [matchers[i] for i in live]
            t = time.perf_counter()
            if batched:
                eng.fill_batch(ms, bitmask[: len(ms)])
            else:
                for r, m in enumerate(ms):
                    eng.fill(m, bitmask, r)
            dt = time.perf_counter() - t
            steps.append((len(ms), dt))
            for r, i in enumerate(live):
                tid = seqs[i][1][pos[i]]
                assert _allowed(bitmask, r, tid), (label, i, tid)
                assert eng.accept(matchers[i], tid)
                pos[i] += 1
        full = [dt for n, dt in steps if n == BATCH]
        out[f"batch_{label}_ms"] = summarize([x * 1e3 for x in full], ps=(50, 99))
        out[f"batch_{label}_steps"] = len(full)
    out["rss_mib"] = _rss_mib()
    out["features"] = features(eng, tok)
    return out


def features(eng, tok) -> dict:
    """Each feature shown by a check that can fail: True, or the error text."""
    def check(fn):
        try:
            return bool(fn()) or "check failed"
        except Exception as exc:  # noqa: BLE001 - reported
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120]}"

    def accepts(c, text: str) -> bool:
        m = eng.matcher(c)
        return all(eng.accept(m, t) for t in tok.encode(text)) and eng.accept(m, tok.eos_token_id)

    strict = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    person = eng.compile("json_schema", PERSON)
    out = {
        # strict: properties the schema does not list are never generated
        "json_schema_strict": check(lambda: accepts(eng.compile("json_schema", {**strict, "additionalProperties": False}),
                                                    '{"a": 1}')
                                    and not accepts(eng.compile("json_schema", {**strict, "additionalProperties": False}),
                                                    '{"a": 1, "b": 2}')),
        "json_schema_pattern": check(lambda: not accepts(person, json.dumps({**PERSON_OUT[1], "email": "x"}))),
        "json_schema_bounds": check(lambda: not accepts(person, json.dumps({**PERSON_OUT[1], "age": 151}))),
        "regex": check(lambda: accepts(eng.compile("regex", "[a-z]+-[0-9]{2}"), "abc-42")
                       and not accepts(eng.compile("regex", "[a-z]+-[0-9]{2}"), "abc-4")),
        "choice": check(lambda: accepts(eng.compile("choice", ["yes", "no"]), "no")
                        and not accepts(eng.compile("choice", ["yes", "no"]), "maybe")),
        "grammar_gbnf": check(lambda: accepts(eng.compile("grammar", GBNF_ARITH), "1+2*3")
                              and not accepts(eng.compile("grammar", GBNF_ARITH), "1++2")),
        "grammar_lark": check(lambda: accepts(eng.compile("lark", 'start: "a" B\nB: /[0-9]+/'), "a12")
                              and not accepts(eng.compile("lark", 'start: "a" B\nB: /[0-9]+/'), "b12")),
        "compile_error_message": check(lambda: _error_of(lambda: eng.compile("json_schema", {"type": "foo"}))),
    }

    def rollback():
        m = eng.matcher(person)
        ids = tok.encode(json.dumps(PERSON_OUT[1]))
        for t in ids[:5]:
            eng.accept(m, t)
        eng.rollback(m, 3)
        return all(eng.accept(m, t) for t in ids[2:]) and eng.accept(m, tok.eos_token_id)

    out["rollback"] = check(rollback)
    out["structural_tag_tool_call"] = check(lambda: _structural_tag(eng, tok, accepts))
    return out


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return str(exc).strip().splitlines()[-1]
    return ""


def _structural_tag(eng, tok, accepts) -> bool:
    """Free text, then a Hermes-style `<tool_call>{...}</tool_call>` whose arguments follow
    WEATHER_ARGS (the shape tool calling needs for tool_choice auto with a grammar)."""
    call = ('Let me check. <tool_call>{"name": "get_weather", "arguments": '
            '{"location": "Paris, France", "unit": "celsius"}}</tool_call>')
    bad = call.replace('"celsius"', '"kelvin"')
    schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_ARGS},
              "required": ["name", "arguments"], "additionalProperties": False}
    if eng.name == "xgrammar":
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [
            {"type": "tag", "begin": "<tool_call>", "content": {"type": "json_schema", "json_schema": schema},
             "end": "</tool_call>"}]}}
        c = eng.compiler.compile_structural_tag(json.dumps(tag))
    else:
        st = eng.llg.StructTag(trigger="<tool_call>", begin="<tool_call>", grammar=schema, end="</tool_call>")
        c = eng.llg.StructTag.to_grammar([st], assume_special=False)
    return accepts(c, call) and not accepts(c, bad)


# ---- parent: run each engine in its own process, print the table ----------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--quick", action="store_true", help="1 repetition per text instead of 5")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = 1 if args.quick else 5
    if args.child:
        print(json.dumps(measure(args.child, reps)))
        return
    results = []
    for name in args.engines.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name] + (["--quick"] if args.quick else []),
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for r in results:
        colds = [c["compile_cold_s"] * 1e3 for c in r["cases"]]
        rows.append([r["engine"], r["version"], fmt(r["import_s"], 2), fmt(r["import_rss_mib"], 0),
                     fmt(r["tokenizer_info_s"] * 1e3, 0), fmt(statistics.median(colds), 2), fmt(max(colds), 1),
                     fmt(r["fill_us"]["p50"], 1), fmt(r["fill_us"]["p99"], 1), fmt(r["accept_us"]["p50"], 1),
                     fmt(r["batch_one_by_one_ms"]["p50"], 2), fmt(r["batch_batch_call_ms"]["p50"], 2),
                     fmt(r["rss_mib"], 0)])
    print(table(rows, ["engine", "version", "import s", "import MiB", "tok info ms", "compile ms p50",
                       "compile ms max", "mask us p50", "mask us p99", "accept us p50",
                       f"step x{BATCH} ms", f"step x{BATCH} batch ms", "RSS MiB"]))
    print()
    names = [c["name"] for c in results[0]["cases"]]
    rows = [[n] + [x for r in results for x in (fmt(r["cases"][i]["compile_cold_s"] * 1e3, 2),
                                                fmt(r["cases"][i]["fill_us"]["p50"], 1))]
            for i, n in enumerate(names)]
    print(table(rows, ["constraint"] + [f"{r['engine']} {h}" for r in results for h in ("compile ms", "mask us")]))
    print()
    feats = list(results[0]["features"])
    print(table([[f] + [("yes" if r["features"][f] is True else r["features"][f]) for r in results] for f in feats],
                ["feature"] + [r["engine"] for r in results]))
    path = write_json(RESULTS_DIR / "grammar.json", {"env": environment(), "batch": BATCH, "reps": reps,
                                                     "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
