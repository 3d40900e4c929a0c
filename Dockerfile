# The image every manifest in cluster/ names (registry.example.com/speed:ray2.60.0-py311-gpu):
# Ray's GPU image at the exact Ray version of requirements.txt and the Python of the project's
# venv, with requirements.txt installed at build time, so pods never pip-install torch at start.
#
#   docker build -t registry.example.com/speed:ray2.60.0-py311-gpu .
#   docker push registry.example.com/speed:ray2.60.0-py311-gpu
#
# rayproject/ray tags: <ray version>-py<python>-gpu (the default CUDA), -cu<version> for others,
# and no suffix for CPU only. Keep RAY_VERSION equal to the ray pin in requirements.txt
# (tests/test_cluster.py checks it, and the rayVersion of every manifest).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu

ARG RAY_VERSION
WORKDIR /home/ray/speed

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY --chown=ray:users requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && python -c "import ray, torch; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The project (see .dockerignore). Jobs run `python -m ray_jobs.<phase>` from anywhere; a
# `ray job submit --working-dir .` upload still wins, being first on the job's PYTHONPATH.
COPY --chown=ray:users . .
ENV PYTHONPATH=/home/ray/speed \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONUNBUFFERED=1
