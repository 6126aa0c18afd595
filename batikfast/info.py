"""`python -m batikfast.info`: which implementations can run here, and why the others cannot."""
from batikfast import backends


def main() -> None:
    print(backends.report())


if __name__ == "__main__":
    main()
