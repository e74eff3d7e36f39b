"""Which mapping of this process holds an address, and how much of it is resident (/proc/self/smaps)."""

from pathlib import Path


def mapping_of(address: int) -> tuple[str, dict[str, int]]:
    """The file mapped at `address` in this process, and that mapping's smaps fields (kB)."""
    fields, found = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            if found is not None:
                break
            low, high = (int(part, 16) for part in head[0].split("-"))
            found = (head[5] if len(head) > 5 else "") if low <= address < high else None
        elif found is not None and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            fields[head[0][:-1]] = int(head[1])
    assert found is not None, f"no mapping holds address {address:#x}"
    return found, fields

