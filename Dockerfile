# One image for every mes_tasks process: workers, beat, Flower and the CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MES_CELERY_CONFIG=/app/celeryconfig.py
RUN useradd --create-home --uid 10001 mes \
    && mkdir -p /var/lib/mes/reports /var/lib/mes/beat && chown -R mes /var/lib/mes
WORKDIR /app
COPY pyproject.toml requirements.lock README.md celeryconfig.py ./
COPY mes_tasks ./mes_tasks
RUN pip install --no-cache-dir -c requirements.lock .

USER mes
CMD ["celery", "-A", "mes_tasks", "worker", "-P", "solo", "-c", "1", "-Q", "workorder", "-n", "workorder@%h", "--prefetch-multiplier", "1", "-E", "--loglevel", "INFO"]
