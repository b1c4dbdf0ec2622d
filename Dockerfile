# token-broker as a sidecar: the app container in the same pod (network namespace)
# calls http://127.0.0.1:8765/token; the secret comes from a mounted file.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY broker ./broker
# Exactly the versions CI tested (requirements.lock, every download checked against its
# hash), then the broker itself on top of them.
RUN python3 -m venv /opt/token-broker \
    && /opt/token-broker/bin/pip install --no-cache-dir --no-compile --require-hashes \
        -r requirements.lock \
    && /opt/token-broker/bin/pip install --no-cache-dir --no-compile --no-deps . \
    && /opt/token-broker/bin/python -m compileall -q /opt/token-broker

FROM ${PYTHON_IMAGE}
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin token-broker
COPY --from=build /opt/token-broker /opt/token-broker
COPY docker/config.toml /etc/token-broker/config.toml
# Nothing is written at run time: works with a read-only root filesystem. The config
# is found at /etc/token-broker/config.toml (the default path); TOKEN_BROKER_CONFIG
# or --config point elsewhere.
ENV PATH=/opt/token-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Loopback inside the pod's network namespace: neighbours in the pod, nothing else.
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["token-broker", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["token-broker"]
CMD ["serve"]
