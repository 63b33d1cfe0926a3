"""The governor against a fake sysfs tree: steps, pause, hysteresis, bad sensor files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from agent.config import GovernorConfig
from agent.health.governor import NORMAL, PAUSED, THROTTLED, Governor, GovernorThread
from agent.health.sensors import Readings, SensorReader, ThrottleFlags


def cfg(root: Path, **kw: Any) -> GovernorConfig:
    base: dict[str, Any] = {
        "sysfs_root": root,
        "use_psutil": False,
        "soft_limit_c": 70.0,
        "hard_limit_c": 85.0,
        "hysteresis_c": 5.0,
        "step_factor": 0.5,
        "min_fps": 2.0,
    }
    base.update(kw)
    return GovernorConfig(**base)


def test_reads_zones_hwmon_and_names_them(sysfs: Any) -> None:
    sysfs.zone(0, 48.5, "cpu-thermal")
    sysfs.zone(1, 51.0, "gpu-thermal")
    sysfs.hwmon(0, "nvme", {"temp1_input": "40000", "temp1_label": "Composite"})
    r = SensorReader(cfg(sysfs.root)).read()
    assert r.temps_c == {"cpu-thermal": 48.5, "gpu-thermal": 51.0, "nvme.Composite": 40.0}
    assert r.max_temp_c == 51.0


@pytest.mark.parametrize("garbage", ["", "hot", "12.5.1", "\x00\x01", "-273150", "255000"])
def test_garbage_temperature_is_skipped_with_one_warning(
    sysfs: Any, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    sysfs.zone(0, garbage)
    sysfs.zone(1, 55.0)
    reader = SensorReader(cfg(sysfs.root))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            r = reader.read()
    assert r.temps_c == {"cpu-thermal": 55.0}
    warned = [m for m in caplog.messages if "thermal_zone0" in m]
    assert len(warned) == 1  # rate limited: a bad file does not flood the journal


def test_missing_tree_means_no_readings_not_a_crash(tmp_path: Path) -> None:
    r = SensorReader(cfg(tmp_path / "nothing")).read()
    assert r.temps_c == {} and r.throttle is None and r.power_w == {}
    gov = Governor(cfg(tmp_path), base_fps=15.0)
    d = gov.decide(r)
    assert d.state == NORMAL and d.fps_cap == 15.0 and not d.changed


def test_unreadable_zone_file_is_skipped(sysfs: Any) -> None:
    sysfs.zone(1, 60.0)
    zone0 = sysfs.root / "class" / "thermal" / "thermal_zone0"
    zone0.mkdir(parents=True)
    (zone0 / "temp").mkdir()  # reading a directory raises IsADirectoryError
    r = SensorReader(cfg(sysfs.root)).read()
    assert r.temps_c == {"cpu-thermal": 60.0}


def test_rpi_throttle_word_decoded_now_and_since_boot(sysfs: Any) -> None:
    sysfs.throttled("0x50005")
    r = SensorReader(cfg(sysfs.root)).read()
    assert r.throttle == ThrottleFlags(
        0x50005, ("under_voltage", "throttled"), ("under_voltage", "throttled")
    )
    sysfs.throttled("0x80000")
    assert SensorReader(cfg(sysfs.root)).read().throttle == ThrottleFlags(
        0x80000, (), ("soft_temp_limit",)
    )


def test_bad_throttle_word_is_ignored(sysfs: Any) -> None:
    sysfs.throttled("throttled=zz")
    assert SensorReader(cfg(sysfs.root)).read().throttle is None


def test_firmware_throttling_steps_the_cap_down(sysfs: Any) -> None:
    sysfs.zone(0, 50.0)
    sysfs.throttled("0x4")
    gov = Governor(cfg(sysfs.root), base_fps=16.0)
    d = gov.decide(SensorReader(cfg(sysfs.root)).read())
    assert d.state == THROTTLED and d.fps_cap == 8.0 and "throttled" in d.reason


def test_jetson_rails_ina3221_and_hwmon(sysfs: Any) -> None:
    sysfs.ina3221({"VDD_IN": 5200, "VDD_CPU_GPU_CV": 1800})
    sysfs.hwmon(2, "ina3221", {"in1_input": "5000", "curr1_input": "400", "in1_label": "VDD_SOC"})
    r = SensorReader(cfg(sysfs.root)).read()
    assert r.power_w == {"VDD_IN": 5.2, "VDD_CPU_GPU_CV": 1.8, "VDD_SOC": 2.0}
    assert r.total_power_w == 9.0


def temps(t: float) -> Readings:
    return Readings(temps_c={"cpu": t})


def test_soft_limit_steps_down_hard_pauses_and_recovery_has_hysteresis(tmp_path: Path) -> None:
    gov = Governor(cfg(tmp_path), base_fps=16.0)
    trace = []
    for t in [60, 70, 72, 74, 86, 84, 81, 79, 70, 66, 64, 64, 64, 64, 64]:
        d = gov.decide(temps(t))
        trace.append((t, d.state, d.fps_cap))
    assert trace == [
        (60, NORMAL, 16.0),
        (70, THROTTLED, 8.0),  # at the soft limit: step down
        (72, THROTTLED, 4.0),
        (74, THROTTLED, 2.0),  # floor min_fps
        (86, PAUSED, 2.0),  # hard limit: pause
        (84, PAUSED, 2.0),  # still above hard - hysteresis
        (81, PAUSED, 2.0),
        (79, THROTTLED, 2.0),  # cooled: resume at the lowest cap...
        (70, THROTTLED, 2.0),  # ...but 70 is still the soft limit: hold at the floor
        (66, THROTTLED, 2.0),  # between soft - hysteresis and soft: hold
        (64, THROTTLED, 4.0),  # cool: step up
        (64, THROTTLED, 8.0),
        (64, NORMAL, 16.0),
        (64, NORMAL, 16.0),
        (64, NORMAL, 16.0),
    ]


def test_no_oscillation_around_the_soft_limit(tmp_path: Path) -> None:
    gov = Governor(cfg(tmp_path), base_fps=16.0)
    gov.decide(temps(71))
    caps = [gov.decide(temps(t)).fps_cap for t in [69, 68.5, 69.5, 67, 69.9, 66]]
    # the cap only ever moves one way while the temperature stays in the hysteresis band
    assert caps == [8.0] * 6


def test_memory_guard_and_sustained_cpu_guard(tmp_path: Path) -> None:
    gov = Governor(cfg(tmp_path, max_cpu_percent=90.0, min_free_memory_mb=100.0), 16.0)
    assert gov.decide(Readings(free_memory_mb=50.0)).fps_cap == 8.0
    gov = Governor(cfg(tmp_path, max_cpu_percent=90.0), 16.0)
    caps = [gov.decide(Readings(cpu_percent=99.0)).fps_cap for _ in range(4)]
    assert caps == [16.0, 16.0, 8.0, 4.0]  # one busy sample is noise, three are a guard


def test_thread_tick_applies_cap_and_sends_governor_step_events(sysfs: Any) -> None:
    sysfs.zone(0, 50.0)
    caps: list[float] = []
    events: list[tuple[str, dict[str, Any]]] = []
    thread = GovernorThread(
        cfg(sysfs.root), 16.0, caps.append, on_event=lambda n, a: events.append((n, dict(a)))
    )
    thread.tick()
    sysfs.set_temp(0, 75.0)
    thread.tick()
    sysfs.set_temp(0, 90.0)
    thread.tick()
    assert thread.paused
    assert caps == [8.0]  # a pause does not change the cap; the loop stops instead
    assert [e[0] for e in events] == ["governor.step", "governor.step"]
    assert events[0][1]["state"] == THROTTLED and events[0][1]["temp_c"] == 75.0
    assert events[1][1]["state"] == PAUSED and "hard limit" in events[1][1]["reason"]
    snap = thread.snapshot()
    assert snap["state"] == PAUSED and snap["temps_c"] == {"cpu-thermal": 90.0}
