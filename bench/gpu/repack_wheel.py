"""Copy a wheel without the files under some folders (and without their RECORD lines), to carry less.

python bench/gpu/repack_wheel.py SOURCE.whl TARGET_FOLDER --drop studio/
"""

import argparse
import zipfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path, help="the folder the repacked wheel goes to (same file name)")
    parser.add_argument("--drop", action="append", required=True, help="a path prefix inside the wheel to leave out")
    args = parser.parse_args()

    def keep(name: str) -> bool:
        return not name.startswith(tuple(args.drop))

    with (
        zipfile.ZipFile(args.source) as zin,
        zipfile.ZipFile(args.target / args.source.name, "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("RECORD"):
                data = (
                    "\n".join(line for line in data.decode().splitlines() if keep(line.split(",")[0])) + "\n"
                ).encode()
            if keep(item.filename):
                zout.writestr(item, data)


if __name__ == "__main__":
    main()
