"""Reads board sensors: sysfs thermal zones, hwmon, RPi throttle flags, Jetson rails, psutil."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import GovernorConfig

log = logging.getLogger(__name__)

# A missing or garbage sensor file is common on real boards: warn once per file per this
# many seconds, then carry on without it.
WARN_EVERY_S = 600.0
# Which sensors a board has, and their names, only change on hot-plug or a driver reload:
# look again this often so a sensor that appears later is read, not every tick.
RESCAN_S = 30.0
# Readings outside this range are garbage (a disconnected probe reads -273 or 255 C).
PLAUSIBLE_TEMP_C = (-40.0, 150.0)

# Jetson rails that carry the whole module's input: every other rail on the same monitor is
# a part of it (VDD_CPU_GPU_CV and VDD_SOC are fed from VDD_IN), so adding them counts the
# same watts twice. With one of these present the total is that rail alone.
MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# `vcgencmd pmic_read_adc` (Raspberry Pi 5) runs a firmware call of a few ms: not per tick.
PMIC_EVERY_S = 10.0
# "     VDD_CORE_A current(7)=2.14060000A" / "     VDD_CORE_V volt(15)=0.88080000V"
_PMIC_LINE = re.compile(r"\s*(\w+)_([AV]) (?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*")

# Raspberry Pi firmware get_throttled bits: 0-3 now, 16-19 since boot.
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}


@dataclass(frozen=True)
class ThrottleFlags:
    """The Raspberry Pi firmware's throttle word, decoded."""

    raw: int
    now: tuple[str, ...]
    since_boot: tuple[str, ...]

    @classmethod
    def decode(cls, raw: int) -> ThrottleFlags:
        now = tuple(name for bit, name in THROTTLE_BITS.items() if raw >> bit & 1)
        boot = tuple(name for bit, name in THROTTLE_BITS.items() if raw >> (bit + 16) & 1)
        return cls(raw, now, boot)

    def to_dict(self) -> dict[str, Any]:
        return {"raw": hex(self.raw), "now": list(self.now), "since_boot": list(self.since_boot)}


@dataclass(frozen=True)
class SensorLayout:
    """The value files one sensor sweep reads and what each is called, found by one scan."""

    # (temp path, type or zone dir name, zone dir name): the name is settled per sweep,
    # as a repeated type is named <type>.<zone> only when an earlier zone of it read OK
    zones: tuple[tuple[Path, str, str], ...] = ()
    # (temp*_input path, "<chip>.<label or tempN>")
    hwmon_temps: tuple[tuple[Path, str], ...] = ()
    # (INA3221 iio in_power*_input path in mW, rail name)
    ina_power: tuple[tuple[Path, str], ...] = ()
    # (hwmon ina3221 in*_input path in mV, curr*_input path in mA, rail name)
    hwmon_rails: tuple[tuple[Path, Path, str], ...] = ()
    throttle_file_exists: bool = False


def total_power_w(power_w: dict[str, float]) -> tuple[float | None, str]:
    """The board's power from its rails, and how it was worked out.

    Sums only independent rails: a module input rail (VDD_IN on Orin / Xavier NX / TX2,
    POM_5V_IN on the Nano) already holds the others, so it is the total on its own.
    """
    if not power_w:
        return None, "not available"
    for rail in MODULE_INPUT_RAILS:
        if rail in power_w:
            return round(power_w[rail], 3), f"{rail} (module input)"
    return round(sum(power_w.values()), 3), "sum of independent rails"


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail power in W from `vcgencmd pmic_read_adc` output (Raspberry Pi 5 PMIC).

    Each rail has a current (NAME_A) and a voltage (NAME_V) line; a rail with only a
    voltage (EXT5V, BATT) carries no power figure. PMIC outputs are independent rails.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        found = _PMIC_LINE.fullmatch(line)
        if found is None:
            continue
        name, unit, value = found.groups()
        try:
            (amps if unit == "A" else volts)[name] = float(value)
        except ValueError:
            continue
    return {f"pmic.{name}": amps[name] * volts[name] for name in amps if name in volts}


def _read_name(path: Path, encoding: str | None = "ascii") -> str | None:
    """A sensor's name or label file, stripped; None when it cannot be read."""
    try:
        return path.read_text(encoding=encoding).strip()
    except (OSError, UnicodeDecodeError):
        return None


def _sorted_glob(directory: Path, pattern: str) -> list[Path]:
    try:
        return sorted(directory.glob(pattern))
    except OSError:
        return []


@dataclass
class Readings:
    """One sweep of every sensor; absent values mean the board does not have (or hid) it."""

    temps_c: dict[str, float] = field(default_factory=dict)
    throttle: ThrottleFlags | None = None
    power_w: dict[str, float] = field(default_factory=dict)
    cpu_percent: float | None = None
    free_memory_mb: float | None = None

    @property
    def max_temp_c(self) -> float | None:
        return max(self.temps_c.values()) if self.temps_c else None

    @property
    def total_power_w(self) -> float | None:
        return total_power_w(self.power_w)[0]

    @property
    def power_source(self) -> str:
        return total_power_w(self.power_w)[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "temps_c": {k: round(v, 1) for k, v in self.temps_c.items()},
            "max_temp_c": self.max_temp_c,
            "throttle": self.throttle.to_dict() if self.throttle else None,
            "power_w": {k: round(v, 3) for k, v in self.power_w.items()},
            "total_power_w": self.total_power_w,
            "power_source": self.power_source,
            "cpu_percent": self.cpu_percent,
            "free_memory_mb": self.free_memory_mb,
        }


class SensorReader:
    """Reads every sensor the config points at; never raises for a bad sensor file.

    The layout (which files to read, what each is called) is found once and again every
    RESCAN_S or after a discovered file went missing; a sweep then reads only values.
    """

    def __init__(self, config: GovernorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._layout: SensorLayout | None = None
        self._layout_found_s = 0.0
        root = config.sysfs_root
        if root is not None:
            self.thermal_root = root / "class" / "thermal"
            self.hwmon_root = root / "class" / "hwmon"
            self.throttle_file: Path | None = (
                root / "devices" / "platform" / "soc" / "soc:firmware" / "get_throttled"
            )
            self.i2c_root = root / "bus" / "i2c" / "drivers"
            self._use_psutil_temps = False
            self._vcgencmd = None
        else:
            self.thermal_root = config.thermal_root
            self.hwmon_root = config.hwmon_root
            self.throttle_file = config.throttle_file or Path(
                "/sys/devices/platform/soc/soc:firmware/get_throttled"
            )
            self.i2c_root = Path("/sys/bus/i2c/drivers")
            self._use_psutil_temps = config.use_psutil
            self._vcgencmd = shutil.which("vcgencmd") if config.use_vcgencmd else None
        self._use_psutil = config.use_psutil
        # Raspberry Pi 5 PMIC rails: (read at monotonic s, rails); None once the firmware
        # said it has no PMIC ADC (every board before the Pi 5)
        self._pmic: tuple[float, dict[str, float]] | None = (-PMIC_EVERY_S, {})
        self._warned: dict[str, float] = {}
        self.warnings = 0

    def _warn(self, key: str, message: str) -> None:
        self.warnings += 1
        now = time.monotonic()
        last = self._warned.get(key)
        if last is None or now - last >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning("sensor %s (ignored; the governor carries on without it)", message)

    def _sensor_layout(self) -> SensorLayout:
        """The sensor layout; scanned on first use, when RESCAN_S old, or after a miss."""
        now_s = self._clock()
        if self._layout is None or now_s - self._layout_found_s >= RESCAN_S:
            self._layout = self._discover()
            self._layout_found_s = now_s
        return self._layout

    def _discover(self) -> SensorLayout:
        """Lists the sensor directories and reads every name and label file, once."""
        zones = []
        for zone in _sorted_glob(self.thermal_root, "thermal_zone*"):
            temp = zone / "temp"
            # a zone without a temp file gives no reading; it is looked for again at rescan
            if temp.exists():
                zones.append((temp, _read_name(zone / "type") or zone.name, zone.name))
        hwmon_temps = []
        hwmon_rails = []
        for chip in _sorted_glob(self.hwmon_root, "hwmon*"):
            chip_name = _read_name(chip / "name")
            for inp in _sorted_glob(chip, "temp*_input"):
                label = _read_name(chip / inp.name.replace("_input", "_label"))
                if label is None:
                    label = inp.name.replace("_input", "")
                hwmon_temps.append((inp, f"{chip_name or chip.name}.{label}"))
            if chip_name is None or "ina3221" not in chip_name:
                continue
            for volt in _sorted_glob(chip, "in*_input"):
                index = volt.name.removeprefix("in").removesuffix("_input")
                curr = chip / f"curr{index}_input"
                if not curr.exists():
                    continue
                rail = _read_name(chip / f"in{index}_label", encoding=None)
                hwmon_rails.append(
                    (volt, curr, f"{chip_name}.rail{index}" if rail is None else rail)
                )
        ina_power = []
        ina = self.i2c_root / "ina3221x"
        if ina.is_dir():
            for power in _sorted_glob(ina, "*/iio:device*/in_power*_input"):
                index = power.name.removeprefix("in_power").removesuffix("_input")
                rail = _read_name(power.parent / f"rail_name_{index}", encoding=None)
                ina_power.append((power, f"rail{index}" if rail is None else rail))
        return SensorLayout(
            zones=tuple(zones),
            hwmon_temps=tuple(hwmon_temps),
            ina_power=tuple(ina_power),
            hwmon_rails=tuple(hwmon_rails),
            throttle_file_exists=self.throttle_file is not None and self.throttle_file.exists(),
        )

    def _read_number(self, path: Path, what: str) -> float | None:
        try:
            text = path.read_text(encoding="ascii", errors="strict").strip()
        except FileNotFoundError:
            # every path read here was discovered: one gone means hot-unplug or a driver
            # reload, so the next look scans the layout again
            self._layout = None
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self._warn(str(path), f"{path}: cannot read {what} ({exc})")
            return None
        try:
            return float(text)
        except ValueError:
            shown = text[:30]
            self._warn(str(path), f"{path}: {what} is not a number ({shown!r})")
            return None

    def _temp_c(self, path: Path) -> float | None:
        milli = self._read_number(path, "temperature")
        if milli is None:
            return None
        temp_c = milli / 1000.0
        lo, hi = PLAUSIBLE_TEMP_C
        if not lo <= temp_c <= hi:
            self._warn(str(path), f"{path}: temperature {temp_c:.1f} C is not plausible")
            return None
        return temp_c

    # Each public reader looks the layout up; read() takes it once for the whole sweep, so a
    # file found missing mid-sweep makes the next sweep scan again, not the rest of this one.

    def thermal_zones(self) -> dict[str, float]:
        """Temperatures of /sys/class/thermal/thermal_zone*, named by their type file."""
        return self._zone_temps(self._sensor_layout())

    def hwmon_temps(self) -> dict[str, float]:
        """temp*_input of /sys/class/hwmon/hwmon*, named <chip>.<label or tempN>."""
        return self._hwmon_temps(self._sensor_layout())

    def throttle_flags(self) -> ThrottleFlags | None:
        """RPi throttle word from the firmware sysfs file, else `vcgencmd get_throttled`."""
        return self._throttle_flags(self._sensor_layout())

    def jetson_power_w(self) -> dict[str, float]:
        """Jetson power rails: INA3221 in_power*_input (mW), or hwmon in*_input x curr*_input."""
        return self._rail_power_w(self._sensor_layout())

    def _zone_temps(self, layout: SensorLayout) -> dict[str, float]:
        temps: dict[str, float] = {}
        for temp_path, kind, zone_name in layout.zones:
            temp_c = self._temp_c(temp_path)
            if temp_c is None:
                continue
            temps[kind if kind not in temps else f"{kind}.{zone_name}"] = temp_c
        return temps

    def _hwmon_temps(self, layout: SensorLayout) -> dict[str, float]:
        temps: dict[str, float] = {}
        for input_path, name in layout.hwmon_temps:
            temp_c = self._temp_c(input_path)
            if temp_c is not None:
                temps[name] = temp_c
        return temps

    def psutil_temps(self) -> dict[str, float]:
        if not self._use_psutil_temps:
            return {}
        try:
            import psutil

            found = psutil.sensors_temperatures()
        except (AttributeError, OSError, RuntimeError) as exc:
            self._warn("psutil", f"psutil temperatures: {exc}")
            return {}
        temps: dict[str, float] = {}
        for chip, entries in found.items():
            for i, entry in enumerate(entries):
                lo, hi = PLAUSIBLE_TEMP_C
                if lo <= entry.current <= hi:
                    temps[f"{chip}.{entry.label or i}"] = float(entry.current)
        return temps

    def _throttle_flags(self, layout: SensorLayout) -> ThrottleFlags | None:
        if self.throttle_file is not None and layout.throttle_file_exists:
            try:
                text = self.throttle_file.read_text(encoding="ascii").strip()
                return ThrottleFlags.decode(int(text, 16))
            except FileNotFoundError:
                self._layout = None  # gone since the scan: ask vcgencmd, as without the file
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self._warn(
                    str(self.throttle_file), f"{self.throttle_file}: bad throttle word ({exc})"
                )
                return None
        if self._vcgencmd is None:
            return None
        try:
            done = subprocess.run(
                [self._vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2.0
            )
            # "throttled=0x50005"
            return ThrottleFlags.decode(int(done.stdout.strip().split("=", 1)[1], 16))
        except (OSError, subprocess.SubprocessError, IndexError, ValueError) as exc:
            self._warn("vcgencmd", f"vcgencmd get_throttled: {exc}")
            return None

    def _rail_power_w(self, layout: SensorLayout) -> dict[str, float]:
        rails: dict[str, float] = {}
        for power_path, label in layout.ina_power:
            milliwatts = self._read_number(power_path, "rail power")
            if milliwatts is not None:
                rails[label] = milliwatts / 1000.0
        for volt_path, curr_path, label in layout.hwmon_rails:
            millivolts = self._read_number(volt_path, "rail voltage")
            milliamps = self._read_number(curr_path, "rail current")
            if millivolts is not None and milliamps is not None:
                rails[label] = millivolts * milliamps / 1e6
        return rails

    def pmic_power_w(self) -> dict[str, float]:
        """Raspberry Pi 5 PMIC rail power from `vcgencmd pmic_read_adc`, at most every
        PMIC_EVERY_S; {} on boards without it (asked once, then never again)."""
        if self._vcgencmd is None or self._pmic is None:
            return {}
        read_s, rails = self._pmic
        now_s = self._clock()
        if now_s - read_s < PMIC_EVERY_S:
            return rails
        try:
            done = subprocess.run(
                [self._vcgencmd, "pmic_read_adc"], capture_output=True, text=True, timeout=2.0
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._warn("vcgencmd", f"vcgencmd pmic_read_adc: {exc}")
            self._pmic = (now_s, {})
            return {}
        rails = parse_pmic_adc(done.stdout) if done.returncode == 0 else {}
        # a Pi 4 answers "error=2 error_msg=..." or nothing parsable: no PMIC, stop asking
        self._pmic = (now_s, rails) if rails else None
        return rails

    def read(self) -> Readings:
        layout = self._sensor_layout()
        temps = self._zone_temps(layout)
        for name, value in self._hwmon_temps(layout).items():
            temps.setdefault(name, value)
        for name, value in self.psutil_temps().items():
            temps.setdefault(name, value)
        readings = Readings(
            temps_c=temps,
            throttle=self._throttle_flags(layout),
            power_w=self._rail_power_w(layout) or self.pmic_power_w(),
        )
        if self._use_psutil:
            try:
                import psutil

                readings.cpu_percent = float(psutil.cpu_percent(interval=None))
                readings.free_memory_mb = round(psutil.virtual_memory().available / 2**20, 1)
            except (OSError, RuntimeError) as exc:
                self._warn("psutil", f"psutil cpu/memory: {exc}")
        return readings
