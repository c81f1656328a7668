#!/usr/bin/env bash
# Make Fashion-MNIST (the embedded default) available. Never fails the install: says what to do instead.
set -u
PY=${1:-python3}
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: found the Debian package's IDX files in $DEB_DIR"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
  if (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      && [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: installed in $DEB_DIR"
    exit 0
  fi
  echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist; trying torchvision"
fi
ROOT=${RADMARK_DATA:-data}/fashion_mnist
if "$PY" -c "import torchvision, sys; torchvision.datasets.FashionMNIST(sys.argv[1], download=True)" "$ROOT" >/dev/null 2>&1; then
  echo "Fashion-MNIST: downloaded with torchvision into $ROOT"
  exit 0
fi
cat <<MSG
Fashion-MNIST: NOT available (no Debian package, no network). Tests do not need it, experiments do.
  Fix: as root run 'apt-get install dataset-fashion-mnist', or copy the four IDX files
  (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)
  into $ROOT, or set data.root=/path/to/them.
MSG
exit 0
