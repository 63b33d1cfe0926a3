"""Reads board sensors: sysfs thermal zones, hwmon, RPi throttle flags, Jetson rails, psutil."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import GovernorConfig

log = logging.getLogger(__name__)

# A missing or garbage sensor file is common on real boards: warn once per file per this
# many seconds, then carry on without it.
WARN_EVERY_S = 600.0
# Readings outside this range are garbage (a disconnected probe reads -273 or 255 C).
PLAUSIBLE_TEMP_C = (-40.0, 150.0)

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
        return round(sum(self.power_w.values()), 3) if self.power_w else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "temps_c": {k: round(v, 1) for k, v in self.temps_c.items()},
            "max_temp_c": self.max_temp_c,
            "throttle": self.throttle.to_dict() if self.throttle else None,
            "power_w": {k: round(v, 3) for k, v in self.power_w.items()},
            "total_power_w": self.total_power_w,
            "cpu_percent": self.cpu_percent,
            "free_memory_mb": self.free_memory_mb,
        }


class SensorReader:
    """Reads every sensor the config points at; never raises for a bad sensor file."""

    def __init__(self, config: GovernorConfig) -> None:
        self.config = config
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
        self._warned: dict[str, float] = {}
        self.warnings = 0

    def _warn(self, key: str, message: str) -> None:
        self.warnings += 1
        now = time.monotonic()
        last = self._warned.get(key)
        if last is None or now - last >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning("sensor %s (ignored; the governor carries on without it)", message)

    def _read_number(self, path: Path, what: str) -> float | None:
        try:
            text = path.read_text(encoding="ascii", errors="strict").strip()
        except FileNotFoundError:
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

    def thermal_zones(self) -> dict[str, float]:
        """Temperatures of /sys/class/thermal/thermal_zone*, named by their type file."""
        temps: dict[str, float] = {}
        try:
            zones = sorted(self.thermal_root.glob("thermal_zone*"))
        except OSError:
            return temps
        for zone in zones:
            temp_c = self._temp_c(zone / "temp")
            if temp_c is None:
                continue
            try:
                kind = (zone / "type").read_text(encoding="ascii").strip() or zone.name
            except (OSError, UnicodeDecodeError):
                kind = zone.name
            temps[f"{kind}" if kind not in temps else f"{kind}.{zone.name}"] = temp_c
        return temps

    def hwmon_temps(self) -> dict[str, float]:
        """temp*_input of /sys/class/hwmon/hwmon*, named <chip>.<label or tempN>."""
        temps: dict[str, float] = {}
        try:
            chips = sorted(self.hwmon_root.glob("hwmon*"))
        except OSError:
            return temps
        for chip in chips:
            try:
                chip_name = (chip / "name").read_text(encoding="ascii").strip() or chip.name
            except (OSError, UnicodeDecodeError):
                chip_name = chip.name
            for inp in sorted(chip.glob("temp*_input")):
                temp_c = self._temp_c(inp)
                if temp_c is None:
                    continue
                label_file = chip / inp.name.replace("_input", "_label")
                try:
                    label = label_file.read_text(encoding="ascii").strip()
                except (OSError, UnicodeDecodeError):
                    label = inp.name.replace("_input", "")
                temps[f"{chip_name}.{label}"] = temp_c
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

    def throttle_flags(self) -> ThrottleFlags | None:
        """RPi throttle word from the firmware sysfs file, else `vcgencmd get_throttled`."""
        if self.throttle_file is not None and self.throttle_file.exists():
            try:
                text = self.throttle_file.read_text(encoding="ascii").strip()
                return ThrottleFlags.decode(int(text, 16))
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

    def jetson_power_w(self) -> dict[str, float]:
        """Jetson power rails: INA3221 in_power*_input (mW), or hwmon in*_input x curr*_input."""
        rails: dict[str, float] = {}
        ina = self.i2c_root / "ina3221x"
        if ina.is_dir():
            for power in sorted(ina.glob("*/iio:device*/in_power*_input")):
                milliwatts = self._read_number(power, "rail power")
                if milliwatts is None:
                    continue
                index = power.name.removeprefix("in_power").removesuffix("_input")
                try:
                    label = (power.parent / f"rail_name_{index}").read_text().strip()
                except OSError:
                    label = f"rail{index}"
                rails[label] = milliwatts / 1000.0
        try:
            chips = sorted(self.hwmon_root.glob("hwmon*"))
        except OSError:
            chips = []
        for chip in chips:
            try:
                name = (chip / "name").read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if "ina3221" not in name:
                continue
            for volt in sorted(chip.glob("in*_input")):
                index = volt.name.removeprefix("in").removesuffix("_input")
                curr = chip / f"curr{index}_input"
                if not curr.exists():
                    continue
                millivolts = self._read_number(volt, "rail voltage")
                milliamps = self._read_number(curr, "rail current")
                if millivolts is None or milliamps is None:
                    continue
                try:
                    label = (chip / f"in{index}_label").read_text().strip()
                except OSError:
                    label = f"{name}.rail{index}"
                rails[label] = millivolts * milliamps / 1e6
        return rails

    def read(self) -> Readings:
        temps = self.thermal_zones()
        for name, value in self.hwmon_temps().items():
            temps.setdefault(name, value)
        for name, value in self.psutil_temps().items():
            temps.setdefault(name, value)
        readings = Readings(
            temps_c=temps, throttle=self.throttle_flags(), power_w=self.jetson_power_w()
        )
        if self._use_psutil:
            try:
                import psutil

                readings.cpu_percent = float(psutil.cpu_percent(interval=None))
                readings.free_memory_mb = round(psutil.virtual_memory().available / 2**20, 1)
            except (OSError, RuntimeError) as exc:
                self._warn("psutil", f"psutil cpu/memory: {exc}")
        return readings
