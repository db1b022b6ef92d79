# The sweep worker's image: the checkout with its locked environment and the TPU runtime (libtpu), as
# `make install TPU=1` installs it on a TPU VM. Build from the repository root:
#   docker build -f deploy/images/octft.Dockerfile -t REGION-docker.pkg.dev/PROJECT/octft/octft:$(git rev-parse --short HEAD) .
# The image holds no data, checkpoint or credentials: the JobSet mounts the checkpoint and takes the stores' URLs
# and the B2 keys from a Secret.
FROM python:3.11-slim-bookworm

RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends make git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/octft
COPY . /opt/octft
# The same install as on a TPU VM: uv, the lock, torch_xla's `tpu` extra. Bytecode compiled at install, so every
# trial runner starts without compiling torch, MLflow and Optuna first.
RUN make install TPU=1 && rm -rf /root/.cache/uv

ENV PATH=/opt/octft/.venv/bin:$PATH
# The manifests name the command (`octft sweep launch ...`); run alone, the image prints the commands.
CMD ["octft", "--help"]
