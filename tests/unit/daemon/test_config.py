"""The daemon's configuration: defaults, key paths in every error, sinks checked at build."""

from __future__ import annotations

from pathlib import Path

import pytest

from conntrail.daemon.build import build_all, sink_filter
from conntrail.daemon.config import DEFAULT_CONFIG, load, parse
from conntrail.errors import ConfigError
from conntrail.model import EventKind
from conntrail.pipeline.queued import FullPolicy

BASE = """
[pipelines.p]
netns = ["a"]
[pipelines.p.sinks.out]
type = "stdout"
"""


def test_built_in_defaults_are_the_issue_default() -> None:
    config = load(None)
    assert config.origin == "built-in defaults" and parse(DEFAULT_CONFIG, "x") is not None
    (pipeline,) = config.pipelines
    assert pipeline.events == {EventKind.NEW, EventKind.DESTROY}
    assert pipeline.attribution.enabled and pipeline.netns == ("",)
    assert [(s.name, s.type) for s in pipeline.sinks] == [("flows", "file"),
                                                          ("history", "sqlite")]
    # The history store needs the whole lifecycle and the start-up table.
    assert EventKind.UPDATE in pipeline.source_events and pipeline.source_dump
    assert config.metrics.listen == "127.0.0.1:9477"
    built = build_all(config)["default"]
    assert [item.queued.name for item in built] == ["flows", "history"]


@pytest.mark.parametrize(("text", "path", "reason"), [
    ("[daemon]\nusr = 'x'\n" + BASE, "daemon.usr", "did you mean 'user'"),
    ("[pipelines.p]\nevents = ['new', 'boom']\n[pipelines.p.sinks.o]\ntype = 'stdout'\n",
     "pipelines.p.events", "boom"),
    ("[pipelines.p]\nfilter = 'proto =='\n[pipelines.p.sinks.o]\ntype = 'stdout'\n",
     "pipelines.p.filter", ""),
    ("[pipelines.p]\n[pipelines.p.sinks.o]\ntype = 'kafka'\n", "pipelines.p.sinks.o.type",
     "one of: file, syslog"),
    ("[pipelines.p]\n[pipelines.p.sinks.o]\ntype = 'file'\nqueue = true\n",
     "pipelines.p.sinks.o.queue", "not a boolean"),
    ("[pipelines.p]\n[pipelines.p.sinks.o]\ntype = 'file'\nwhen_full = 'later'\n",
     "pipelines.p.sinks.o.when_full", "block, spill, drop_oldest, drop"),
    ("[pipelines.p]\n[pipelines.p.sinks.h]\ntype = 'sqlite'\nevents = ['new']\n",
     "pipelines.p.sinks.h.events", "whole lifecycle"),
    ("[pipelines.p]\n", "pipelines.p.sinks", "no sink configured"),
    ("", "pipelines", "no pipeline"),
    ("[metrics]\nlisten = 'localhost'\n" + BASE, "metrics.listen", ""),
    ("[pipelines.p.attribution]\nebpf = 'maybe'\n[pipelines.p.sinks.o]\ntype = 'stdout'\n",
     "pipelines.p.attribution.ebpf", "auto, on, off"),
    (BASE + "[pipelines.q]\nnetns = ['a']\n[pipelines.q.sinks.o]\ntype = 'stdout'\n",
     "pipelines.q.netns", "already in pipelines.p"),
    ("[daemon]\ngroup = 'adm'\n" + BASE, "daemon.group", "only applies with daemon.user"),
    ("[pipelines.p\n", "t.toml", "not valid TOML"),
])
def test_errors_name_the_key_path(text: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "t.toml")
    assert caught.value.path.startswith(path), caught.value
    assert reason in str(caught.value)


def test_a_sinks_own_keys_are_checked_when_built() -> None:
    config = parse(BASE.replace('type = "stdout"', 'type = "file"\nrotate_szie = "1M"'), "t")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.sinks\.out\.rotate_szie: unknown "
                       r"key; did you mean 'rotate_size'"):
        build_all(config)


def test_daemon_keys_of_a_sink_are_not_the_sinks_business() -> None:
    config = parse(BASE.replace('type = "stdout"', 'type = "file"\nqueue = 8\n'
                                'when_full = "drop_oldest"\nretry = false\n'
                                'filter = "proto == tcp"\nevents = ["destroy"]'), "t")
    (item,) = build_all(config)["p"]
    assert item.queued.policy is FullPolicy.DROP_OLDEST and item.queued._retry is None
    assert item.settings.events == frozenset({EventKind.DESTROY})


def test_sink_filter_uses_the_sinks_or_the_pipelines_kinds() -> None:
    from tests.unit.formats.sample import SNAT_TCP

    config = parse(BASE.replace('type = "stdout"', 'type = "stdout"\nevents = ["destroy"]'),
                   "t")
    pipeline = config.pipelines[0]
    keep = sink_filter(pipeline, pipeline.sinks[0])
    assert keep is not None
    assert not keep(SNAT_TCP._replace(kind=EventKind.NEW))
    assert keep(SNAT_TCP._replace(kind=EventKind.DESTROY))


def test_spill_sinks_get_a_directory_per_sink_without_creating_it(tmp_path: Path) -> None:
    config = parse(f"[daemon]\nstate_dir = '{tmp_path}'\n"
                   + BASE.replace('type = "stdout"', 'type = "stdout"\nwhen_full = "spill"'),
                   "t")
    (item,) = build_all(config)["p"]
    assert item.spill_dir == tmp_path / "spill" / "p.out"
    assert not item.spill_dir.exists()  # a check must not create anything


def test_restart_only_settings_are_told_apart() -> None:
    one = parse(BASE, "t")
    sinks_changed = parse(BASE + "[pipelines.p.sinks.more]\ntype = 'stdout'\n", "t")
    netns_changed = parse(BASE.replace('["a"]', '["b"]'), "t")
    assert one.source_settings() == sinks_changed.source_settings()
    assert one.source_settings() != netns_changed.source_settings()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


def test_history_stores_do_not_spill() -> None:
    with pytest.raises(ConfigError, match=r"sinks\.h\.when_full: a history store cannot spill"):
        parse("[pipelines.p]\n[pipelines.p.sinks.h]\ntype = 'sqlite'\nwhen_full = 'spill'\n",
              "t")


def test_two_sinks_on_one_file_are_refused(tmp_path: Path) -> None:
    text = f"""
[daemon]
log_dir = "{tmp_path}"
[pipelines.a]
netns = ["a"]
[pipelines.a.sinks.flows]
type = "file"
[pipelines.b]
netns = ["b"]
[pipelines.b.sinks.flows]
type = "file"
"""
    with pytest.raises(ConfigError, match=r"pipelines\.b\.sinks\.flows: writes to .*flows\.jsonl"
                       r", as pipelines\.a\.sinks\.flows does"):
        build_all(parse(text, "t"))
