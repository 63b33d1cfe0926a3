"""The governor against a fake sysfs tree: steps, pause, hysteresis, bad sensor files."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import GovernorConfig
from agent.health.governor import NORMAL, PAUSED, THROTTLED, Governor, GovernorThread
from agent.health.sensors import RESCAN_S, Readings, SensorReader, ThrottleFlags


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
    # VDD_IN feeds the other two: the module's power is VDD_IN alone, never 9.0 W
    assert r.total_power_w == 5.2
    assert r.power_source == "VDD_IN (module input)"


@dataclass(frozen=True)
class BoardPower:
    """One board's rail layout (as its sysfs shows it) and the total it must report."""

    name: str
    iio_rails_mw: dict[str, float]
    hwmon_rails: dict[str, str]
    total_w: float | None
    source: str


BOARD_POWER = [
    # Orin Nano / NX on L4T 36: hwmon ina3221, VDD_IN is the module input
    BoardPower(
        "orin-hwmon",
        {},
        {
            "in1_label": "VDD_IN",
            "in1_input": "5000",
            "curr1_input": "1200",
            "in2_label": "VDD_CPU_GPU_CV",
            "in2_input": "5000",
            "curr2_input": "300",
            "in3_label": "VDD_SOC",
            "in3_input": "5000",
            "curr3_input": "250",
        },
        6.0,
        "VDD_IN (module input)",
    ),
    # Jetson Nano on L4T 32: iio ina3221x, POM_5V_IN is the module input
    BoardPower(
        "nano-iio",
        {"POM_5V_IN": 3900, "POM_5V_GPU": 400, "POM_5V_CPU": 1100},
        {},
        3.9,
        "POM_5V_IN (module input)",
    ),
    # AGX Orin: no whole-module rail; its monitors' rails are independent inputs
    BoardPower(
        "agx-orin",
        {"VDD_GPU_SOC": 4000, "VDD_CPU_CV": 2000, "VIN_SYS_5V0": 3000},
        {},
        9.0,
        "sum of independent rails",
    ),
    BoardPower("no-rails", {}, {}, None, "not available"),
]


@pytest.mark.parametrize("board", BOARD_POWER, ids=lambda b: b.name)
def test_board_power_sums_only_independent_rails(sysfs: Any, board: BoardPower) -> None:
    if board.iio_rails_mw:
        sysfs.ina3221(board.iio_rails_mw)
    if board.hwmon_rails:
        sysfs.hwmon(1, "ina3221", board.hwmon_rails)
    r = SensorReader(cfg(sysfs.root)).read()
    assert r.total_power_w == board.total_w
    assert r.power_source == board.source
    assert r.to_dict()["power_source"] == board.source


# Real `vcgencmd pmic_read_adc` output of a Raspberry Pi 5 (trimmed to five rails).
PI5_PMIC_ADC = """\
     3V7_WL_SW_A current(0)=0.00390372A
       3V3_SYS_A current(1)=0.05269074A
      DDR_VDD2_A current(4)=0.01171116A
     VDD_CORE_A current(7)=0.70000000A
          HDMI_A current(11)=0.00000000A
     3V7_WL_SW_V volt(12)=3.74426500V
       3V3_SYS_V volt(13)=3.31208800V
      DDR_VDD2_V volt(16)=1.11172000V
     VDD_CORE_V volt(19)=0.88000000V
          HDMI_V volt(23)=5.14800000V
         EXT5V_V volt(24)=5.14800000V
          BATT_V volt(25)=0.00000000V
"""


def _fake_vcgencmd(bin_dir: Path, pmic_output: str | None, calls: Path) -> None:
    """A `vcgencmd` on PATH answering like the firmware (a Pi 4 has no pmic_read_adc)."""
    bin_dir.mkdir()
    out = bin_dir / "pmic.txt"
    out.write_text(pmic_output or "")
    script = bin_dir / "vcgencmd"
    pmic = f'cat "{out}"' if pmic_output is not None else 'echo "error=2 error_msg=..."; exit 2'
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{calls}"\n'
        'case "$1" in\n'
        "  get_throttled) echo throttled=0x0 ;;\n"
        f"  pmic_read_adc) {pmic} ;;\n"
        "esac\n"
    )
    script.chmod(0o755)


@pytest.mark.parametrize(
    ("board", "pmic_output", "total_w", "source"),
    [
        # 0.0146 + 0.1745 + 0.0130 + 0.6160 + 0 W (current x voltage per rail)
        ("pi5", PI5_PMIC_ADC, 0.818, "sum of independent rails"),
        ("pi4", None, None, "not available"),
    ],
)
def test_raspberry_pi_pmic_power(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    board: str,
    pmic_output: str | None,
    total_w: float | None,
    source: str,
) -> None:
    calls = tmp_path / "calls.txt"
    _fake_vcgencmd(tmp_path / "bin", pmic_output, calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    clock = FakeClock()
    config = GovernorConfig(
        thermal_root=tmp_path / "thermal",
        hwmon_root=tmp_path / "hwmon",
        throttle_file=tmp_path / "no-throttle-file",
        use_psutil=False,
    )
    reader = SensorReader(config, clock=clock)
    first = reader.read()
    assert first.total_power_w == (None if total_w is None else pytest.approx(total_w, abs=1e-3))
    assert first.power_source == source
    if pmic_output is not None:
        assert "pmic.VDD_CORE" in first.power_w and "pmic.EXT5V" not in first.power_w
    for _ in range(3):
        clock.now_s += 1.0
        reader.read()
    asked = calls.read_text().splitlines().count("pmic_read_adc")
    # a Pi 5 is asked once per PMIC_EVERY_S, a board without a PMIC ADC only once ever
    assert asked == 1
    clock.now_s += 60.0
    reader.read()
    asked = calls.read_text().splitlines().count("pmic_read_adc")
    assert asked == (2 if pmic_output is not None else 1)


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def jetson_like(sysfs: Any) -> list[Path]:
    """Zones (one type twice), an nvme chip, INA3221 rails both ways; returns the value files."""
    values = [
        sysfs.zone(0, 41.0, "CPU-therm"),
        sysfs.zone(1, 40.5, "GPU-therm"),
        sysfs.zone(2, 42.0, "SOC-therm"),
        sysfs.zone(3, 43.0, "SOC-therm"),
        sysfs.zone(4, 39.0, "tj-thermal"),
    ]
    nvme = sysfs.hwmon(
        0, "nvme", {"temp1_input": "38000", "temp1_label": "Composite", "temp2_input": "39000"}
    )
    values += [nvme / "temp1_input", nvme / "temp2_input"]
    rails = {"in1_input": "5000", "curr1_input": "400", "in1_label": "VDD_SOC"}
    rails |= {"in2_input": "5000", "curr2_input": "200", "in2_label": "VDD_CPU"}
    ina = sysfs.hwmon(1, "ina3221", rails)
    values += [ina / name for name in ["in1_input", "curr1_input", "in2_input", "curr2_input"]]
    sysfs.ina3221({"VDD_IN": 5200, "VDD_CPU_GPU_CV": 1800, "VDD_DDR": 900})
    iio = sysfs.root / "bus" / "i2c" / "drivers" / "ina3221x" / "1-0040" / "iio:device0"
    values += [iio / f"in_power{i}_input" for i in range(3)]
    return values


class FileOps:
    """Counts the reader's file operations: reads by path, and listings and stats."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[Path] = []
        self.lookups = 0
        read_text = Path.read_text

        def counted_read(path: Path, *args: Any, **kwargs: Any) -> str:
            self.reads.append(path)
            return read_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", counted_read)
        for name in ["glob", "exists", "is_dir"]:
            monkeypatch.setattr(Path, name, self._counted(getattr(Path, name)))

    def _counted(self, method: Any) -> Any:
        def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
            self.lookups += 1
            return method(path, *args, **kwargs)

        return counted

    def clear(self) -> None:
        self.reads.clear()
        self.lookups = 0


def test_a_sweep_reads_only_value_files_once_the_layout_is_known(
    sysfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = jetson_like(sysfs)
    ops = FileOps(monkeypatch)
    reader = SensorReader(cfg(sysfs.root), clock=FakeClock())
    first = reader.read()
    assert first.temps_c == {
        "CPU-therm": 41.0,
        "GPU-therm": 40.5,
        "SOC-therm": 42.0,
        "SOC-therm.thermal_zone3": 43.0,  # a repeated type is named by its zone
        "tj-thermal": 39.0,
        "nvme.Composite": 38.0,
        "nvme.temp2": 39.0,  # no label file: named by the input
    }
    assert first.power_w == {
        "VDD_IN": 5.2,
        "VDD_CPU_GPU_CV": 1.8,
        "VDD_DDR": 0.9,
        "VDD_SOC": 2.0,
        "VDD_CPU": 1.0,
    }
    assert len(ops.reads) > len(values) and ops.lookups > 0  # the scan reads names too
    ops.clear()
    assert reader.read() == first
    assert sorted(ops.reads) == sorted(values)  # each value file once, no name, no listing
    assert ops.lookups == 0


def test_names_are_read_once_values_every_sweep(sysfs: Any) -> None:
    sysfs.zone(0, 50.0, "cpu-thermal")
    clock = FakeClock()
    reader = SensorReader(cfg(sysfs.root), clock=clock)
    assert reader.read().temps_c == {"cpu-thermal": 50.0}
    (sysfs.root / "class" / "thermal" / "thermal_zone0" / "type").write_text("soc-thermal\n")
    sysfs.set_temp(0, 61.0)
    assert reader.read().temps_c == {"cpu-thermal": 61.0}  # new value, name as found
    clock.now_s += RESCAN_S
    assert reader.read().temps_c == {"soc-thermal": 61.0}


def test_a_zone_that_appears_later_is_read_after_the_next_scan(sysfs: Any) -> None:
    sysfs.zone(0, 50.0)
    clock = FakeClock()
    reader = SensorReader(cfg(sysfs.root), clock=clock)
    reader.read()
    sysfs.zone(1, 55.0, "gpu-thermal")
    clock.now_s += RESCAN_S - 1
    assert reader.read().temps_c == {"cpu-thermal": 50.0}  # not looked for yet
    clock.now_s += 1
    assert reader.read().temps_c == {"cpu-thermal": 50.0, "gpu-thermal": 55.0}


def test_a_removed_zone_drops_out_quietly_and_the_layout_is_found_again(
    sysfs: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = sysfs.zone(0, 50.0)
    sysfs.zone(1, 60.0, "gpu-thermal")
    # the clock never moves: only the missing file can make the reader scan again
    reader = SensorReader(cfg(sysfs.root), clock=FakeClock())
    reader.read()
    shutil.rmtree(sysfs.root / "class" / "thermal" / "thermal_zone1")  # driver unloaded
    with caplog.at_level(logging.WARNING):
        assert reader.read().temps_c == {"cpu-thermal": 50.0}
    assert caplog.messages == [] and reader.warnings == 0
    # the driver comes back under a new zone number: the next sweep scans and finds it
    readded = sysfs.zone(2, 58.0, "gpu-thermal")
    assert reader.read().temps_c == {"cpu-thermal": 50.0, "gpu-thermal": 58.0}
    ops = FileOps(monkeypatch)
    reader.read()
    assert sorted(ops.reads) == [kept, readded] and ops.lookups == 0


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


@pytest.mark.parametrize(
    ("power", "source", "shown"),
    [
        (
            6.0,
            "VDD_IN (module input)",
            "power:      6.0 W (VDD_IN (module input)), 0.3 J/inference",
        ),
        (None, "not available", "power:      not available (no power rails or PMIC on this board)"),
    ],
)
def test_status_says_where_power_comes_from(power: float | None, source: str, shown: str) -> None:
    from agent.commands.daemon import format_status

    snap = {
        "state": "running",
        "fps": 20.0,
        "power_w": power,
        "power_source": source,
        "energy_per_inference_j": 0.3 if power else None,
    }
    assert shown in format_status(snap, running=True).splitlines()
