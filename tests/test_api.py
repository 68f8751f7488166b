"""The Python API (featcache.api, re-exported as featcache.<name>): the same options, defaults,
results and errors as the command line."""
import inspect
import pkgutil
import json

import click
import pytest
from click.testing import CliRunner

import featcache
from conftest import write_tree
from featcache import api
from featcache.cli import cli

# command -> API function
COMMANDS = {"extract": "extract_features", "info": "info", "verify": "verify", "repair": "repair", "merge": "merge",
            "bases": "bases", "train": "train", "compare": "compare", "search": "search", "report": "report",
            "predict": "predict", "export": "export", "finetune": "finetune", "ensemble": "ensemble", "upgrade": "upgrade", "audit": "audit", "similar": "similar", "demo": "demo"}
# Options that shape only the command's own output or exit status.
CLI_ONLY = {"as_json", "strict", "no_progress", "fail_on_leaks"}
# CLI parameter name -> API parameter name, where they differ.
RENAMED = {"ray_address": "ray", "paths": "run_dir", "format_": "format"}


def test_every_command_has_an_api_function_exported_from_featcache():
    assert set(COMMANDS) <= set(cli.commands), "a command was renamed: update COMMANDS"
    for command, name in COMMANDS.items():
        assert getattr(featcache, name) is getattr(api, name)
        assert getattr(api, name).__doc__ and "Returns" in getattr(api, name).__doc__, name
    assert set(cli.commands) <= set(COMMANDS), f"commands without an API function: {set(cli.commands) - set(COMMANDS)}"


def test_the_stage_packages_keep_their_names():
    import featcache.extract.pipeline  # noqa: F401  (the package, not a function, once imported)

    assert inspect.ismodule(featcache.extract) and inspect.ismodule(featcache.cache)
    # A function named like a module of the package would be shadowed once that module is imported.
    modules = {m.name for m in pkgutil.iter_modules(featcache.__path__)}
    assert not modules & set(api.__all__), modules & set(api.__all__)
    assert callable(featcache.extract_features) and featcache.FeatcacheError is api.FeatcacheError


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_api_takes_every_cli_option_with_the_same_default(command):
    parameters = inspect.signature(getattr(api, COMMANDS[command])).parameters
    for param in cli.commands[command].params:
        if param.name in CLI_ONLY:
            continue
        name = RENAMED.get(param.name, param.name)
        assert name in parameters, f"{command}: option {param.name} missing from api.{COMMANDS[command]}"
        if param.required:
            assert parameters[name].default is inspect.Parameter.empty, (command, name)
        elif isinstance(param, click.Option):
            expected = parameters[name].default
            default = param.default if not param.multiple else ()
            if default is getattr(click.core, "UNSET", None):  # click >= 8.3: "no default" is a sentinel
                default = None
            if param.is_flag and not default:
                default = False
            if name == "ray":  # --ray [ADDRESS]: unset is None, a bare flag is "" (a local Ray)
                assert (param.default, param.flag_value) == (None, "")
                continue
            assert default == expected or (default in ((), None) and expected is None), (command, name, default, expected)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if "seconds" not in k and k not in ("images_per_second", "wall_images_per_second", "created")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return write_tree(root / "images", splits={"train": 6, "validation": 3, "test": 3})


def test_api_results_equal_what_json_prints(tree, tmp_path):
    cli_store, api_store = tmp_path / "cli.h5", tmp_path / "api.h5"
    printed = run("extract", tree, cli_store, "--base", "pixels", "--size", "8", "--no-progress", "--json")
    assert printed.exit_code == 0, printed.stderr
    returned = featcache.extract_features(tree, api_store, base="pixels", size=8, progress=False)
    expected = json.loads(printed.stdout)
    assert _without_timings({**returned, "store": None}) == _without_timings({**expected, "store": None})

    info = json.loads(run("info", cli_store, "--json").stdout)
    assert featcache.info(cli_store) == info
    assert featcache.bases() == json.loads(run("bases", "--json").stdout)

    cli_run = json.loads(run("train", cli_store, "--head", "logreg", "--pool", "avg", "--out", tmp_path / "r1",
                             "--json").stdout)
    api_run = featcache.train(api_store, head="logreg", pool="avg", out=tmp_path / "r2")
    assert _without_timings({**api_run, "run_dir": None, "report": None}) == _without_timings(
        {**cli_run, "run_dir": None, "report": None})
    assert api_run["report"] == str(tmp_path / "r2" / "report.html")
    cli_report = json.loads(run("report", tmp_path / "r1", "--out", tmp_path / "r1.html", "--json").stdout)
    api_report = featcache.report(tmp_path / "r1", out=tmp_path / "r1-api.html")
    assert _without_timings({**api_report, "report": None, "bytes": None}) == _without_timings(
        {**cli_report, "report": None, "bytes": None})
    assert cli_report["mistakes"] == 0 and cli_report["map_points"] == 6  # 3 test images per class

    cli_cmp = json.loads(run("compare", cli_store, "--heads", "logreg", "--json").stdout)
    api_cmp = featcache.compare(api_store, heads=["logreg"])
    assert _without_timings({**api_cmp, "store": None}) == _without_timings({**cli_cmp, "store": None})

    images = tree / "test" / "cats"
    cli_pred = json.loads(run("predict", tmp_path / "r1", images, "--json").stdout)
    api_pred = featcache.predict(tmp_path / "r1", images)
    assert api_pred == cli_pred and len(api_pred["predictions"]) == 3

    featcache.train(cli_store, head="logreg", C=0.1, out=tmp_path / "r3")
    members = [tmp_path / "r1", tmp_path / "r3"]
    cli_ens = json.loads(run("ensemble", *members, "--weights", "fit", "--out", tmp_path / "e1", "--json").stdout)
    api_ens = featcache.ensemble(members, weights="fit", out=tmp_path / "e2")
    ignored = {"run_dir": None, "report": None}
    assert _without_timings({**api_ens, **ignored}) == _without_timings({**cli_ens, **ignored})


def test_api_errors_are_the_cli_error_line(tmp_path):
    missing = tmp_path / "missing.h5"
    printed = run("info", missing)
    assert printed.exit_code == 1
    with pytest.raises(featcache.FeatcacheError) as raised:
        featcache.info(missing)
    assert printed.stderr.strip() == f"error: {raised.value}"
    with pytest.raises(featcache.FeatcacheError, match="expected three fractions"):
        featcache.extract_features(tmp_path, tmp_path / "x.h5", base="pixels", split="0.5,0.5")
