"""The GCS API server the object-store tests run: PyPI gcp-storage-emulator, serving on 127.0.0.1,
plus the two response headers of a media download it leaves out and TensorStore (Orbax's writer)
reads, as the real service sends them: x-goog-generation and x-goog-metageneration.

    python tests/gcs_server.py PORT BUCKET
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the 404 stands
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))


objects.download = download  # objects.get(alt=media) calls it by name; the route table holds it too
server.HANDLERS = tuple((regex, {m: download if h is _download else h for m, h in handlers.items()})
                        for regex, handlers in server.HANDLERS)

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
