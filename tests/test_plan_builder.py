"""brainsurgery.Plan and Assertion (issue 11, item 6): the builder generated from the engine's
transform specs, its YAML, its round trips, and the generated stub.

References are independent of the builder: plans written by hand as YAML and read by PyYAML,
outputs compared byte for byte and against NumPy, key tables read straight from
``_core.transform_specs()`` with the naming rule restated here.
"""

from __future__ import annotations

import inspect
import keyword
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import brainsurgery as bs
from brainsurgery import Assertion, Plan, _core
from conftest import read, save_safetensors, tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
SPECS = _core.transform_specs()
BY_NAME = {s["name"]: s for s in SPECS}
OPERATORS = BY_NAME["assert"]["operators"]


def py(name: str) -> str:
    """The naming rule, restated: a character a name cannot hold becomes an underscore (`set`'s
    `dry-run` is `dry_run`), and a Python keyword gets a trailing underscore."""
    name = re.sub(r"\W", "_", name)
    return name + "_" if keyword.iskeyword(name) else name


def literal_default(key: dict[str, Any]) -> Any:
    """What the signature should show for an optional key, decided here from the key table."""
    d, kind = key["default"], key["type"]
    if d is None or " " in d:
        return None
    if kind == "bool":
        return {"true": True, "false": False}[d]
    if kind == "number":
        return float(d) if "." in d else int(d)
    if kind in ("string", "dtype"):
        return d
    return None


def engine_doc(source: Any) -> dict[str, Any]:
    """The document the engine sees for a plan source."""
    return _core.plan_document(source)


# -- one method per transform -------------------------------------------------------------------


def test_every_transform_in_the_specs_has_a_method() -> None:
    assert len(SPECS) >= 39
    for spec in SPECS:
        method = getattr(Plan, py(spec["name"]))
        assert callable(method), spec["name"]
        assert spec["doc"] in method.__doc__
        # A method appends exactly its transform.
        plan = Plan()
        if spec["name"] == "assert":
            method(plan, exists="x")
        else:
            required = [k for k in spec["keys"] if k["required"]]
            method(plan, **{py(k["name"]): f"v{i}" for i, k in enumerate(required)})
        (entry,) = plan.to_dict()["transforms"]
        assert (entry if isinstance(entry, str) else next(iter(entry))) == spec["name"]
    assert Plan.assert_ is not None and not hasattr(Plan, "assert")


def test_signatures_match_the_key_tables() -> None:
    for spec in SPECS:
        if spec["name"] == "assert":
            continue
        sig = inspect.signature(getattr(Plan(), py(spec["name"])))
        params = list(sig.parameters.values())
        assert [p.name for p in params] == [py(k["name"]) for k in sig_order(spec["keys"])], spec["name"]
        required = [k for k in spec["keys"] if k["required"]]
        for p, key in zip(params, sig_order(spec["keys"])):
            if key["required"]:
                assert p.default is inspect.Parameter.empty, (spec["name"], p.name)
                assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            else:
                assert p.default == literal_default(key), (spec["name"], p.name, p.default)
                short_form = not required and key is spec["keys"][0]
                expected = inspect.Parameter.POSITIONAL_OR_KEYWORD if short_form else inspect.Parameter.KEYWORD_ONLY
                assert p.kind is expected, (spec["name"], p.name)
            assert key["doc"] in getattr(Plan, py(spec["name"])).__doc__
    # Spot checks of what the rule gives.
    assert str(inspect.signature(Plan().copy)) == "(from_: 'Reference', to: 'Template') -> 'Self'"
    sig = inspect.signature(Plan().delete)
    assert sig.parameters["missing_ok"].default is False
    assert inspect.signature(Plan().save).parameters["format"].default is None  # "by extension, else ..."
    assert inspect.signature(Plan().save).parameters["shard"].default == "5GB"
    assert inspect.signature(Plan().fill).parameters["std"].default == 1
    assert "assert_" in inspect.signature(Plan().help).parameters


def sig_order(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [k for k in keys if k["required"]] + [k for k in keys if not k["required"]]


def test_assertion_constructors_match_the_operators() -> None:
    names = {op["name"] for op in OPERATORS}
    assert {"exists", "count", "equal", "all", "any", "not"} <= names
    for op in OPERATORS:
        constructor = getattr(Assertion, py(op["name"]))
        params = inspect.signature(constructor).parameters
        if op["keys"]:
            assert list(params) == [py(k["name"]) for k in sig_order(op["keys"])]
        keywords = inspect.signature(Plan().assert_).parameters
        assert py(op["name"]) in keywords


def test_help_shows_the_keys() -> None:
    doc = Plan.scale_.__doc__
    assert doc.startswith("scale_: ")
    assert "``scale`` writes new tensors instead" in doc
    assert "target: reference, required." in doc and "by: number, required." in doc
    assert "from_ (key ``from``)" in Plan.copy.__doc__
    assert "default: false" in Plan.delete.__doc__


def test_methods_chain_and_write_table_order() -> None:
    plan = Plan(inputs=["m::in.safetensors"])
    result = plan.scale_(by=0.5, target="x").copy(to="b", from_="a").exit()
    assert result is plan
    assert plan.to_dict() == {
        "inputs": ["m::in.safetensors"],
        "transforms": [{"scale_": {"target": "x", "by": 0.5}}, {"copy": {"from": "a", "to": "b"}}, "exit"],
    }


def test_keys_under_their_own_spelling_and_none_left_out() -> None:
    plan = Plan().copy(**{"from": "a", "to": "b"}).delete("x", missing_ok=None).dump().help("scale_")
    assert plan.transforms == [{"copy": {"from": "a", "to": "b"}}, {"delete": {"target": "x"}}, "dump", {"help": {"transform": "scale_"}}]
    with pytest.raises(TypeError, match="given twice"):
        Plan().copy("a", to="b", **{"from_": "a", "from": "c"})


def test_short_forms_and_nested_plans(tmp_path: Path) -> None:
    inner = Plan().assert_(exists="h.1.w")
    plan = Plan().prefixes("list").dump("h\\..*", format="tree").execute(inner).execute(plan=Plan(transforms=["exit"]))
    assert plan.transforms == [
        {"prefixes": {"mode": "list"}},
        {"dump": {"target": "h\\..*", "format": "tree"}},
        # A Plan where a transform list goes stands for its transforms; where a plan goes, for itself.
        {"execute": {"transforms": [{"assert": {"exists": "h.1.w"}}]}},
        {"execute": {"plan": {"transforms": ["exit"]}}},
    ]
    # The engine runs the nested transforms: the nested assertion fails on a missing tensor.
    path = save(tmp_path, {"h.1.w": np.ones(2, np.float32)})
    Plan(inputs=[str(path)]).execute(inner).check(quiet=True)
    with pytest.raises(bs.AssertionFailed):
        Plan(inputs=[str(path)]).execute(Plan().assert_(exists="h.2.w")).run(quiet=True)


# -- assertions ---------------------------------------------------------------------------------


def test_assertion_expressions() -> None:
    a = Assertion.count("h\\..*", 0)
    assert a.to_dict() == {"count": {"of": "h\\..*", "is": 0}}
    assert Assertion.count(of="x", is_=2) == Assertion({"count": {"of": "x", "is": 2}})
    both = a & Assertion.exists("x") & {"finite": "y"}
    assert both.to_dict() == {"all": [a.to_dict(), {"exists": {"of": "x"}}, {"finite": "y"}]}
    either = Assertion.dtype("x", "bfloat16") | ~Assertion.iszero("z", eps=1e-6)
    assert either.to_dict() == {
        "any": [{"dtype": {"of": "x", "is": "bfloat16"}}, {"not": {"iszero": {"of": "z", "eps": 1e-6}}}]
    }
    assert Assertion.all(a, {"exists": "q"}).to_dict() == {"all": [a.to_dict(), {"exists": "q"}]}
    assert Assertion.not_(a).to_dict() == {"not": a.to_dict()}
    assert Assertion.dimensions("w", ge=2).to_dict() == {"dimensions": {"of": "w", "ge": 2}}
    plan = Plan().assert_(both).assert_(count={"of": "x", "is": 1}).assert_({"exists": "w"}).assert_(not_=a)
    assert [t["assert"] for t in plan.transforms] == [
        both.to_dict(),
        {"count": {"of": "x", "is": 1}},
        {"exists": "w"},
        {"not": a.to_dict()},
    ]


# -- eager key checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "needle", "transform"),
    [
        (lambda p: p.scale_(target="x", bye=0.5), "unknown key `bye`; did you mean `by`?", "scale_"),
        (lambda p: p.copy(from_="a", tto="b"), "did you mean `to`?", "copy"),
        (lambda p: p.extract_lora("b", "f", "t", "p", max_rnk=4), "did you mean `max_rank`?", "extract_lora"),
        (lambda p: p.copy("a"), "missing required key `to`", "copy"),
        (lambda p: p.append({"scael_": {"target": "x"}}), "unknown transform `scael_`; did you mean `scale_`", "scael_"),
        (lambda p: p.append({"scale_": {"target": "x", "bye": 1}}), "did you mean `by`?", "scale_"),
        (lambda p: p.assert_(cont={"of": "x", "is": 0}), "unknown assertion operator `cont`; did you mean `count`?", "assert"),
        (lambda p: p.assert_(count={"of": "x", "iss": 0}), "unknown key `iss`; did you mean `is`?", "assert"),
        (lambda p: p.assert_(Assertion.exists("a"), exists="b"), "takes one assertion", "assert"),
        (lambda p: p.assert_({"all": [{"exsts": "x"}]}), "did you mean `exists`?", "assert"),
    ],
)
def test_typos_raise_plan_error_with_close_names(call: Any, needle: str, transform: str) -> None:
    plan = Plan(inputs=["x.safetensors"]).exit()
    with pytest.raises(bs.PlanError) as info:
        call(plan)
    assert needle in str(info.value)
    assert info.value.transform == transform
    assert info.value.transform_index == 1
    assert plan.transforms == ["exit"], "a refused transform is not appended"
    assert isinstance(info.value, bs.BrainSurgeryError)


def test_assertion_typos() -> None:
    with pytest.raises(bs.PlanError, match="did you mean `is_`"):
        Assertion.count(of="x", iss=1)
    with pytest.raises(bs.PlanError, match="unknown assertion operator `exist`"):
        Assertion({"exist": "x"})


def test_values_are_left_to_the_engine(tmp_path: Path) -> None:
    plan = Plan(inputs=[str(save(tmp_path, {"x": np.ones(3, np.float32)}))]).scale_("x", by="half")
    with pytest.raises(bs.PlanError, match="by"):
        plan.check(quiet=True)


# -- running ------------------------------------------------------------------------------------


def save(tmp_path: Path, tensors: dict[str, np.ndarray], name: str = "in.safetensors") -> Path:
    path = tmp_path / name
    save_safetensors(path, tensors)
    return path


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    tensors = {
        "a.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "a.bias": rng.standard_normal(6).astype(np.float32),
        "b.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "y": np.arange(3, dtype=np.float32),
    }
    return save(tmp_path, tensors), tensors


BUILT_AS_YAML = r"""
inputs: ['m::{input}']
transforms:
  - copy: {{from: 'm::a\.(.*)', to: 'm::c.\1'}}
  - scale_: {{target: 'c\.weight', by: 0.5}}
  - add: {{from_a: a.weight, from_b: b.weight, to: sum.weight}}
  - cast_: {{target: sum.weight, dtype: float16}}
  - clamp_: {{target: b.weight, min: -0.5, max: 0.5}}
  - permute: {{from: a.weight, to: a_t, order: [1, 0]}}
  - reshape: {{from: a.bias, to: bias2d, shape: [2, 3]}}
  - split: {{from: a.weight, to: [p0, p1], dim: 0}}
  - fill: {{from: 'y', to: 'no', mode: constant, value: 2.0}}
  - delete: {{target: zz, missing_ok: true}}
  - assert:
      all:
        - shape: {{of: a_t, is: [6, 4]}}
        - dtype: {{of: sum.weight, is: float16}}
        - not: {{exists: {{of: zz}}}}
  - assert: {{count: {{of: 'p[01]', is: 2}}}}
  - dump: {{target: 'p.*', format: tree}}
output: {{path: '{output}'}}
"""


def built(input: Path, output: Path) -> Plan:
    return (
        Plan(inputs=[f"m::{input}"], output={"path": str(output)})
        .copy(r"m::a\.(.*)", r"m::c.\1")
        .scale_(r"c\.weight", 0.5)
        .add("a.weight", "b.weight", "sum.weight")
        .cast_("sum.weight", dtype="float16")
        .clamp_("b.weight", min=-0.5, max=0.5)
        .permute("a.weight", "a_t", [1, 0])
        .reshape("a.bias", "bias2d", (2, 3))
        .split("a.weight", ["p0", "p1"], dim=0)
        .fill("y", "no", mode="constant", value=2.0)
        .delete("zz", missing_ok=True)
        .assert_(Assertion.shape("a_t", [6, 4]) & Assertion.dtype("sum.weight", "float16") & ~Assertion.exists("zz"))
        .assert_(count={"of": "p[01]", "is": 2})
        .dump("p.*", format="tree")
    )


def test_built_plan_runs_like_the_yaml_plan(tmp_path: Path, small: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = small
    out_built, out_dict, out_yaml = (tmp_path / f"{n}.safetensors" for n in ("built", "dict", "yaml"))
    plan = built(path, out_built)
    text = BUILT_AS_YAML.format(input=path, output=out_yaml)
    expected = yaml.safe_load(text)
    expected["output"]["path"] = str(out_built)
    assert plan.to_dict() == expected
    assert engine_doc(plan.to_yaml()) == expected

    report = plan.run(quiet=True)
    assert report["written"] == [str(out_built)]
    dict_plan = plan.to_dict()
    dict_plan["output"] = str(out_dict)
    bs.run(dict_plan, quiet=True)
    bs.run(text, quiet=True)
    # The plan's hash in the metadata leaves locations out, so all three files are identical.
    assert out_built.read_bytes() == out_yaml.read_bytes() == out_dict.read_bytes()

    # And the values are what NumPy says.
    got = read(out_built)
    a, b = tensors["a.weight"], tensors["b.weight"]
    np.testing.assert_array_equal(got["c.weight"], a * np.float32(0.5))
    np.testing.assert_array_equal(got["c.bias"], tensors["a.bias"])
    np.testing.assert_array_equal(got["sum.weight"], (a + b).astype(np.float16))
    np.testing.assert_array_equal(got["b.weight"], np.clip(b, -0.5, 0.5))
    np.testing.assert_array_equal(got["a_t"], a.T)
    np.testing.assert_array_equal(got["bias2d"], tensors["a.bias"].reshape(2, 3))
    np.testing.assert_array_equal(got["p0"], a[:2])
    np.testing.assert_array_equal(got["no"], np.full(3, 2.0, np.float32))
    assert plan.check(quiet=True)["tensors"] == report["tensors"]


def test_run_passes_arguments_and_prints(tmp_path: Path, small: tuple[Path, dict[str, np.ndarray]], capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = small
    plan = Plan(inputs=[str(path)]).dump("y").help(assert_="equal")
    report = plan.run(threads=1)
    out = capsys.readouterr().out
    assert "y" in report["output"][0] and "equal" in report["output"][1]
    assert report["output"][1] in out
    report = plan.check(overrides={"transforms[0].dump.target": "a.bias"}, quiet=True)
    assert report["output"][0].startswith("`a.bias` in model: 1 tensor")
    assert capsys.readouterr().out == ""


# -- YAML ---------------------------------------------------------------------------------------

TRICKY = [
    "y", "n", "Y", "no", "No", "yes", "on", "off", "true", "False", "null", "Null", "~",
    "1e3", "1E3", "0x10", "0o17", "017", "1_000", "+1", "-2", ".5", "1.", ".inf", "-.Inf", ".nan",
    "12:30", "2001-12-14", "", " ", " lead", "trail ", "héllo ✓ 日本", "emoji 🧠",
    "a\nb", "a\n", "a\n\n", "\n", "line1\n  indented\nline3", "crlf\r\nx", "\ttab", "x\\y",
    "#comment", "a: b", "a #b", "- x", "? x", "'", '"', "`x", "@x", "%x", "!x", "&x", "*x", "|x", ">x",
    "[x", "{x", "x]", "x," , "=", "<<", "---", "...", "\u2028", "\x85", "\ufeffbom", "\x00nul",
    "x " * 60, ("abc " * 30 + "\n") * 3,
]


@pytest.mark.parametrize("value", TRICKY, ids=range(len(TRICKY)))
def test_to_yaml_reads_back_alike_in_the_engine_and_pyyaml(value: str) -> None:
    plan = Plan(inputs=[f"m::{value}"]).copy(value, value).help(value)
    text = plan.to_yaml()
    assert engine_doc(text) == plan.to_dict()
    assert yaml.safe_load(text) == plan.to_dict()


def test_to_yaml_numbers_and_values() -> None:
    values = [0, -1, 2**63 - 1, 2**64 - 1, 0.5, 1e-6, 1e20, 1e300, -0.0, 123456789.0, True, False, None, [], {}]
    plan = Plan(extra=values)
    text = plan.to_yaml()
    for back in (engine_doc(text), yaml.safe_load(text)):
        assert back == {"extra": values}
        assert [type(v) for v in back["extra"]] == [type(v) for v in values]
    with pytest.raises(bs.PlanError, match="finite"):
        Plan().scale_("x", float("nan")).to_yaml()


def test_one_letter_names_survive_a_run(tmp_path: Path) -> None:
    # YAML 1.1 readers take `y`/`no`/`on` for booleans and `1e3`/`0x10` for numbers; as
    # tensor names they must reach the engine as strings.
    names = ["y", "no", "on", "1e3", "0x10", "héllo"]
    path = save(tmp_path, {n: np.full(2, i, np.float32) for i, n in enumerate(names)})
    out = tmp_path / "out.safetensors"
    plan = Plan(inputs=[str(path)], output=str(out))
    for n in names:
        plan.scale_(re.escape(n), 2.0)
    bs.run(plan.to_yaml(), quiet=True)
    got = read(out)
    assert sorted(got) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(got[n], np.full(2, 2.0 * i, np.float32))


# -- documents and round trips ------------------------------------------------------------------


def test_to_dict_is_a_copy_and_plans_compare_by_content() -> None:
    plan = Plan(inputs={"m": Path("a.safetensors")}, output=Path("out")).copy("a", "b")
    doc = plan.to_dict()
    assert doc == {"inputs": {"m": "a.safetensors"}, "transforms": [{"copy": {"from": "a", "to": "b"}}], "output": "out"}
    doc["transforms"].append("exit")
    doc["transforms"][0]["copy"]["to"] = "c"
    assert plan.to_dict()["transforms"] == [{"copy": {"from": "a", "to": "b"}}]
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(plan.to_dict()) != Plan.from_dict(plan.to_dict()).exit()
    assert Plan().to_dict() == {}
    assert Plan(transforms=[]).to_dict() == {"transforms": []}


def test_repr_is_the_yaml() -> None:
    plan = Plan(inputs=["x.safetensors"]).scale_("w", 0.5)
    assert repr(plan) == plan.to_yaml() == "inputs:\n- x.safetensors\ntransforms:\n- scale_:\n    target: w\n    by: 0.5\n"

    class Printer:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def text(self, s: str) -> None:
            self.parts.append(s)

    p = Printer()
    plan._repr_pretty_(p, False)
    assert "".join(p.parts) == plan.to_yaml()
    # A value no plan can hold does not make repr raise.
    assert "Plan.from_dict" in repr(Plan().scale_("w", float("inf")))


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def plan_texts() -> list[tuple[str, str]]:
    """Every plan file in examples/ and every YAML plan in the README and docs/."""
    out = [(p.name, p.read_text(encoding="utf-8")) for p in sorted((ROOT / "examples").glob("*.yaml"))]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(yaml_blocks(doc)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and {"inputs", "transforms", "output"} & set(data):
                out.append((f"{doc.name}[{i}]", block))
    return out


PLAN_TEXTS = plan_texts()


def test_plan_texts_were_found() -> None:
    names = [n for n, _ in PLAN_TEXTS]
    assert {"demo.yaml", "tour.yaml", "upcycle_moe.yaml"} <= set(names)
    assert any(n.startswith("README.md") for n in names)


@pytest.mark.parametrize(("name", "text"), PLAN_TEXTS, ids=[n for n, _ in PLAN_TEXTS])
def test_plan_texts_round_trip(name: str, text: str) -> None:
    doc = engine_doc(text)
    plan = Plan.from_yaml(text)
    again = plan.to_yaml()
    assert engine_doc(again) == doc
    assert yaml.safe_load(again) == doc
    assert Plan.from_yaml(again) == plan
    assert plan.to_dict() == doc


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory laid out like the repository, with examples/tiny-gpt2, as the cwd."""
    save_safetensors(tmp_path / "examples" / "tiny-gpt2" / "model.safetensors", tiny_gpt2(), {"format": "pt"})
    (tmp_path / "examples" / "tiny-gpt2" / "config.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_run_identically_after_a_round_trip(workdir: Path, example: str) -> None:
    # In the copy of the repository's layout: a plan file's paths are relative to its folder.
    path = workdir / "examples" / example
    shutil.copy(ROOT / "examples" / example, path)
    bs.run(path, quiet=True)
    first = outputs(workdir / "out")
    assert first
    for p in sorted((workdir / "out").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    bs.run(Plan.from_yaml(path).to_yaml(), quiet=True)
    assert outputs(workdir / "out") == first


def test_from_yaml_reads_files_json_lists_and_overrides(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("inputs: [m::x.safetensors]\ntransforms:\n  - scale_: {target: w, by: 2}\n")
    b = tmp_path / "b.json"
    b.write_text('{"output": {"path": "out"}}')
    plan = Plan.from_yaml([a, str(b)], overrides={"transforms[0].scale_.by": 0.25})
    # A file's paths resolve against its folder, made absolute (issue 14 item 3).
    assert plan.to_dict() == {
        "inputs": [f"m::{tmp_path / 'x.safetensors'}"],
        "transforms": [{"scale_": {"target": "w", "by": 0.25}}],
        "output": {"path": str(tmp_path / "out")},
    }
    assert Plan.from_yaml(str(a)).to_dict()["transforms"] == Plan.from_yaml(a.read_text()).to_dict()["transforms"]
    assert Plan.from_yaml(a.read_text()).to_dict()["inputs"] == ["m::x.safetensors"]
    with pytest.raises(bs.PlanError, match="unknown transform `scael_`"):
        Plan.from_yaml("transforms: [{scael_: {target: w}}]")
    with pytest.raises(bs.PlanError):
        Plan.from_dict({"transforms": "exit"})


def test_the_documented_example_runs_and_prints_what_the_doc_shows(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = ROOT / "docs" / "plan-builder.md"
    code = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)[0]
    shown = yaml_blocks(doc)[0]
    save_safetensors(workdir / "model.safetensors", tiny_gpt2())
    exec(compile(code, str(doc), "exec"), {})
    assert capsys.readouterr().out == shown + "\n"
    got = bs.open(workdir / "out" / "model-bf16.safetensors")
    assert "layers.0.attn.c_proj.weight" in got and got["layers.0.attn.c_proj.weight"].dtype.name == "bfloat16"


# -- stubs --------------------------------------------------------------------------------------


def test_committed_stub_is_what_the_engine_generates() -> None:
    from brainsurgery import _plan_stubgen

    committed = (ROOT / "python" / "brainsurgery" / "_plan.pyi").read_text(encoding="utf-8")
    assert committed == _plan_stubgen.render(), (
        "python/brainsurgery/_plan.pyi is stale: regenerate it with `python -m brainsurgery._plan_stubgen`"
    )
    for spec in SPECS:
        assert f"    def {py(spec['name'])}(self" in committed


def test_stubtest_and_mypy_on_the_builder(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is a dev dependency")
    stubtest = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "brainsurgery._plan"], capture_output=True, text=True, cwd=ROOT
    )
    assert stubtest.returncode == 0, stubtest.stdout + stubtest.stderr
    # The stub stands in for _plan.py when the package is checked; the module itself is checked here.
    impl = subprocess.run(
        [sys.executable, "-m", "mypy", "python/brainsurgery/_plan.py"], capture_output=True, text=True, cwd=ROOT
    )
    assert impl.returncode == 0, impl.stdout + impl.stderr
    # A user's code gets the generated methods from the stub: right calls pass, typos fail.
    good = tmp_path / "good.py"
    good.write_text(
        textwrap.dedent(
            """
            import brainsurgery as bs
            plan: bs.Plan = bs.Plan(inputs=["m::x"]).copy("a", "b").scale_(target="x", by=0.5).assert_(
                bs.Assertion.count("x", 0) & ~bs.Assertion.exists("y"))
            text: str = plan.to_yaml()
            """
        )
    )
    bad = tmp_path / "bad.py"
    bad.write_text("import brainsurgery as bs\nbs.Plan().copy(frm='a', to='b')\nbs.Plan().scael_('x', 1)\n")
    ok = subprocess.run([sys.executable, "-m", "mypy", str(good)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = subprocess.run([sys.executable, "-m", "mypy", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert fail.returncode == 1
    assert 'Unexpected keyword argument "frm"' in fail.stdout
    assert 'has no attribute "scael_"' in fail.stdout


def test_a_new_engine_transform_gets_a_method_without_python_edits() -> None:
    # Stands in for a transform added to the Rust registry: the specs gain an entry, nothing else.
    script = textwrap.dedent(
        """
        import inspect
        from brainsurgery import _core
        real = _core.transform_specs
        def specs():
            return real() + [
                {"name": "frobnicate", "doc": "frob tensors", "form": "plain", "in_place": False, "twin": None,
                 "keys": [{"name": "from", "type": "reference", "required": True, "default": None, "doc": "what"},
                          {"name": "lambda", "type": "number", "required": False, "default": "2", "doc": "how"}]},
                {"name": "run", "doc": "a name Plan already uses", "form": "plain", "in_place": False,
                 "twin": None, "keys": []},
            ]
        _core.transform_specs = specs
        from brainsurgery import Plan
        print(inspect.signature(Plan.frobnicate))
        print(Plan().frobnicate("x", lambda_=3).run_().to_dict())
        print(Plan.frobnicate.__doc__.splitlines()[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(self, from_: 'Reference', *, lambda_: 'float | None' = 2) -> 'Self'"
    assert lines[1] == "{'transforms': [{'frobnicate': {'from': 'x', 'lambda': 3}}, 'run']}"
    assert lines[2] == "frobnicate: frob tensors"
