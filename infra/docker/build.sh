#!/usr/bin/env bash
# Build vggprice's images on this machine with BuildKit, from the repository root:
#   infra/docker/build.sh [--debian-base] IMAGE...     IMAGE: cpu gpu postgres moto
# Tags: vggprice-worker:cpu, vggprice-worker:gpu, vggprice-postgres, vggprice-moto.
# --debian-base builds on infra/docker/debian-base.sh's image (no registry needed);
# otherwise BASE_IMAGE if set, else each Dockerfile's official base.
# pip inside a build uses this machine's pip configuration: the index URLs, trusted hosts,
# timeout and CA bundle that `pip config list` shows (local paths left out), as BuildKit
# secrets that never land in a layer. A .venv here also constrains the versions to its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--debian-base" ]; then
  shift
  BASE_IMAGE=$(infra/docker/debian-base.sh)
fi
[ $# -gt 0 ] || { sed -n '2,9p' "$0" >&2; exit 2; }

# BuildKit: Docker >= 23 needs its buildx plugin; Debian's docker.io (20.10) has BuildKit
# built in, so use its CLI when the docker on PATH has no buildx.
docker=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then docker=/usr/bin/docker; fi

secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
"$py" - "$secrets" <<'PY'
import subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
conf = {}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in listed.splitlines():
    key, _, value = line.partition("=")
    conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
keep = ["[global]"]
for key in ("index-url", "extra-index-url"):
    urls = [u for u in conf.get(key, "").split() if u.startswith(("http://", "https://"))]
    if urls:
        keep.append(f"{key} = {' '.join(urls)}")
for key in ("trusted-host", "timeout", "default-timeout", "retries", "proxy"):
    if conf.get(key):
        keep.append(f"{key.replace('default-', '')} = {conf[key]}")
if conf.get("cert") and Path(conf["cert"]).is_file():
    (out / "ca.crt").write_bytes(Path(conf["cert"]).read_bytes())
    keep.append("cert = /run/secrets/ca.crt")
(out / "pip.conf").write_text("\n".join(keep) + "\n")
PY
touch "$secrets/ca.crt" "$secrets/constraints.txt" "$secrets/none.txt"
echo "constraint = /run/secrets/constraints.txt" >> "$secrets/pip.conf"
if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip list --format=freeze --exclude-editable 2>/dev/null \
    | grep -v -E '^(pip|setuptools|wheel)==' > "$secrets/constraints.txt"
fi

for image in "$@"; do
  case $image in
    cpu|gpu) tag=vggprice-worker:$image ;;
    postgres|moto) tag=vggprice-$image ;;
    *) echo "unknown image $image (cpu gpu postgres moto)" >&2; exit 2 ;;
  esac
  # The GPU image keeps its base's TensorFlow: no constraints from a CPU .venv.
  constraints=$secrets/constraints.txt
  [ "$image" != gpu ] || constraints=$secrets/none.txt
  args=(--file "infra/docker/Dockerfile.$image" --tag "$tag" --label vggprice.build=1
        --secret "id=pip.conf,src=$secrets/pip.conf" --secret "id=ca.crt,src=$secrets/ca.crt"
        --secret "id=constraints.txt,src=$constraints")
  [ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  echo "building $tag${BASE_IMAGE:+ on $BASE_IMAGE} ..." >&2
  DOCKER_BUILDKIT=1 "$docker" build --progress=plain "${args[@]}" . >&2
  echo "$tag"
done
# Earlier builds of these tags, now untagged: only ours (by label), never other images.
"$docker" image prune --force --filter label=vggprice.build=1 >/dev/null
