"""The shell script an SSH probe runs on a VM, and the parser of its output.

The script needs only a POSIX shell and the usual Linux tools (`cat`, `head`, `cut`,
`wc`, `ps`, `who`), plus `nvidia-smi` for the GPU readings. It prints one section per
reading, each opened by a marker line, so a missing tool leaves its section empty
instead of shifting the others:

    @@tdbot:probe 1
    @@tdbot:gpu            nvidia-smi CSV lines: utilisation %, memory MiB
    @@tdbot:gpu-status N   exit status of nvidia-smi, 127 when it is not installed
    @@tdbot:loadavg        /proc/loadavg
    @@tdbot:netdev         /proc/net/dev
    @@tdbot:who            number of logged-in sessions
    @@tdbot:ps             process command lines, at most MAX_PROCESSES of MAX_PROCESS_CHARS
    @@tdbot:end
"""

from __future__ import annotations

from dataclasses import dataclass

MARKER = "@@tdbot:"
HEADER = f"{MARKER}probe 1"
END = f"{MARKER}end"
GPU_MISSING_STATUS = 127
MAX_GPU_LINES = 64
MAX_PROCESSES = 500
MAX_PROCESS_CHARS = 200

# Runs as `sh -s` with the script on standard input, so the login shell of the user
# (bash, zsh or fish) only has to start `sh`. LC_ALL=C keeps numbers in "0.52" form.
PROBE_COMMAND = "sh -s"
PROBE_SCRIPT = f"""\
export LC_ALL=C
echo '{HEADER}'
echo '{MARKER}gpu'
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits 2>&1)
  status=$?
  printf '%s\\n' "$gpu" | head -n {MAX_GPU_LINES}
else
  status={GPU_MISSING_STATUS}
fi
echo "{MARKER}gpu-status $status"
echo '{MARKER}loadavg'
cat /proc/loadavg 2>/dev/null
echo '{MARKER}netdev'
cat /proc/net/dev 2>/dev/null
echo '{MARKER}who'
who 2>/dev/null | wc -l
echo '{MARKER}ps'
ps -eo args= 2>/dev/null | head -n {MAX_PROCESSES} | cut -c 1-{MAX_PROCESS_CHARS}
echo '{END}'
"""

# Command lines of the probe's own processes, left out of the process list so that a
# `busy_processes` pattern such as "*sh*" does not match the probe itself.
PROBE_PROCESSES = frozenset(
    {
        PROBE_COMMAND,
        "ps -eo args=",
        f"head -n {MAX_PROCESSES}",
        f"cut -c 1-{MAX_PROCESS_CHARS}",
    }
)

SECTIONS = ("gpu", "gpu-status", "loadavg", "netdev", "who", "ps")


class ProbeOutputError(ValueError):
    """The probe's output does not have the expected sections or values."""


@dataclass(frozen=True)
class ProbeReading:
    """Readings of one run of the probe script on a VM.

    A reading the VM could not provide is None. `gpu_error` is the reason the GPU readings
    are None when nvidia-smi is missing or failed. `network_bytes` is the total of
    received and sent bytes of every interface but the loopback since boot.
    """

    gpu_util_percent: float | None
    gpu_memory_mb: float | None
    gpu_error: str | None
    cpu_load: float | None
    network_bytes: int | None
    sessions: int | None
    processes: tuple[str, ...]


def parse_probe_output(text: str) -> ProbeReading:
    """Parse the output of PROBE_SCRIPT; raise ProbeOutputError when it is malformed."""
    sections = _split_sections(text)
    gpu_util, gpu_memory, gpu_error = _parse_gpu(sections["gpu"], sections["gpu-status"])
    return ProbeReading(
        gpu_util_percent=gpu_util,
        gpu_memory_mb=gpu_memory,
        gpu_error=gpu_error,
        cpu_load=_parse_loadavg(sections["loadavg"]),
        network_bytes=_parse_netdev(sections["netdev"]),
        sessions=_parse_who(sections["who"]),
        processes=_parse_processes(sections["ps"]),
    )


def _split_sections(text: str) -> dict[str, list[str]]:
    """Split the output into the lines of each section, keyed by section name.

    The process list is taken as every line between its marker and the last line, so
    a command line that happens to start with the marker stays a command line.
    """
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].strip() != HEADER:
        raise ProbeOutputError(f"output does not start with {HEADER!r}: {_excerpt(text)}")
    if lines[-1].strip() != END:
        raise ProbeOutputError(f"output does not end with {END!r}; it may have been cut off")

    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for index, line in enumerate(lines[1:-1], start=1):
        if not line.startswith(MARKER):
            if current is None:
                raise ProbeOutputError(f"line {index + 1} is outside any section")
            current.append(line)
            continue
        name, _, value = line.removeprefix(MARKER).partition(" ")
        if name not in SECTIONS or name in sections:
            raise ProbeOutputError(f"unexpected section marker {line!r}")
        current = sections[name] = [value] if value else []
        if name == "ps":
            current.extend(lines[index + 1 : -1])
            break

    missing = [name for name in SECTIONS if name not in sections]
    if missing:
        raise ProbeOutputError(f"sections missing from the output: {', '.join(missing)}")
    return sections


def _parse_gpu(
    lines: list[str], status_lines: list[str]
) -> tuple[float | None, float | None, str | None]:
    """Return the highest utilisation, the total memory in use, and an error text.

    Several GPUs: the busiest one decides the utilisation, and memory is summed. A
    value of "[N/A]" (reported by some GPUs, such as MIG partitions) makes that reading
    None, because the other GPUs alone cannot show that every GPU is idle.
    """
    status = _parse_int(status_lines, "gpu-status")
    output = [line.strip() for line in lines if line.strip()]
    if status == GPU_MISSING_STATUS:
        return None, None, "nvidia-smi is not installed"
    if status != 0:
        first = output[0] if output else "no output"
        return None, None, f"nvidia-smi failed with exit status {status}: {first[:200]}"
    if not output:
        return None, None, "nvidia-smi listed no GPU"

    utilisations: list[float | None] = []
    memories: list[float | None] = []
    for line in output:
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2:
            raise ProbeOutputError(f"nvidia-smi line {line!r} does not have 2 fields")
        utilisations.append(_gpu_number(fields[0], line))
        memories.append(_gpu_number(fields[1], line))
    utilisation = None if None in utilisations else max(v for v in utilisations if v is not None)
    memory = None if None in memories else sum(v for v in memories if v is not None)
    return utilisation, memory, None


def _gpu_number(text: str, line: str) -> float | None:
    if text.startswith("[") or text in ("N/A", "Not Supported"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ProbeOutputError(
            f"nvidia-smi line {line!r} has a value that is not a number"
        ) from None


def _parse_loadavg(lines: list[str]) -> float | None:
    """Return the 1-minute load average, or None when /proc/loadavg was not readable."""
    text = " ".join(lines).strip()
    if not text:
        return None
    try:
        return float(text.split()[0])
    except ValueError:
        raise ProbeOutputError(
            f"/proc/loadavg content {text[:80]!r} is not a load average"
        ) from None


def _parse_netdev(lines: list[str]) -> int | None:
    """Return received plus sent bytes over every interface except the loopback.

    Each data line of /proc/net/dev reads "name: rx_bytes rx_packets ... tx_bytes ...",
    with 8 receive fields before the sent bytes. The two header lines contain "|".
    """
    total = 0
    interfaces = 0
    for line in lines:
        if "|" in line or ":" not in line:
            continue
        name, _, counters = line.partition(":")
        fields = counters.split()
        if len(fields) < 9 or not (fields[0].isdigit() and fields[8].isdigit()):
            raise ProbeOutputError(f"/proc/net/dev line {line.strip()[:80]!r} is malformed")
        interfaces += 1
        if name.strip() != "lo":
            total += int(fields[0]) + int(fields[8])
    return total if interfaces else None


def _parse_who(lines: list[str]) -> int | None:
    text = " ".join(lines).strip()
    return None if not text else _parse_int(lines, "who")


def _parse_processes(lines: list[str]) -> tuple[str, ...]:
    processes: list[str] = []
    for line in lines[:MAX_PROCESSES]:
        command = line.strip()[:MAX_PROCESS_CHARS]
        if command and command not in PROBE_PROCESSES:
            processes.append(command)
    return tuple(processes)


def _parse_int(lines: list[str], section: str) -> int:
    text = " ".join(lines).strip()
    try:
        return int(text)
    except ValueError:
        raise ProbeOutputError(
            f"section {section} contains {text[:40]!r}, which is not a whole number"
        ) from None


def _excerpt(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return repr(first[:80]) if first else "empty output"
