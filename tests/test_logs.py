import logging

import pytest

from exo.common.logs import _ModuleFilter, parse_spec


def test_per_module_levels() -> None:
    default, per = parse_spec("warning,broker=info,nodes.engine=debug")
    assert default == logging.WARNING
    assert per == {"exo.broker": logging.INFO, "exo.nodes.engine": logging.DEBUG}
    f = _ModuleFilter(default, per)

    def rec(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, "", 0, "m", None, None)

    assert f.filter(rec("exo.nodes.engine.engine", logging.DEBUG))
    assert not f.filter(rec("exo.nodes.link", logging.INFO))
    assert f.filter(rec("exo.broker.broker", logging.INFO))
    assert not f.filter(rec("exo.broker.broker", logging.DEBUG))


def test_bad_level_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_spec("broker=loud")
