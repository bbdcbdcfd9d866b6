# scoring-gateway: docker build -t scoring-gateway . && docker run -v $PWD/gateway.yaml:/etc/gateway/gateway.yaml ...
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway
COPY --from=build /install /usr/local
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# The slim image has no curl; the standard library is enough. A config with another server.port
# needs `docker run --health-cmd` (or a HEALTHCHECK in a derived image) to match.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["gateway", "serve"]
CMD ["--config", "/etc/gateway/gateway.yaml"]
