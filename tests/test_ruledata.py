"""rulecache.py is what rules/*.yaml say (ruledata.py reads a file through it only while
its text is the one cached, else parses the YAML). No root needed."""

from __future__ import annotations

from ipmasq_legacy import rulecache, ruledata


def test_cache_is_current():
    """Stale after an edit of rules/: `python -m ipmasq_legacy.ruledata` writes it anew."""
    assert set(rulecache.RULES) == set(ruledata.NAMES)
    for name in ruledata.NAMES:
        text, data = rulecache.RULES[name]
        assert text == ruledata._text(name), f"rulecache.py is stale for rules/{name}.yaml"
        assert data == ruledata.parse(text)


def test_an_edited_file_is_parsed(monkeypatch):
    text = ruledata._text("iptables")
    edited = text.replace("chain: IPMASQ-LEGACY\n", "chain: IPMASQ-EDITED\n", 1)
    monkeypatch.setattr(ruledata, "_text", lambda name: edited)
    ruledata.load.cache_clear()
    try:
        assert ruledata.load("iptables")["chain"] == "IPMASQ-EDITED"
    finally:
        ruledata.load.cache_clear()


def test_write_cache_round_trips(tmp_path):
    path = tmp_path / "rulecache.py"
    ruledata.write_cache(path)
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    assert scope["RULES"] == rulecache.RULES
