"""The tests' GCS server (devkit/gcs_emulator.py) behaves as real GCS where the job relies on it.

Object names are flat strings, kept verbatim; listings come in pages of at most 1,000 entries.
Everything goes through the real google-cloud-storage client.
"""
from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.api_core import exceptions
from google.cloud import storage

MANY = 2500

# Valid GCS names that a path-normalising store would mangle, merge or refuse.
ODD_NAMES = {
    "dotdot-component": "NORMAL/../PNEUMONIA/a.jpeg",
    "dot-component": "NORMAL/./a.jpeg",
    "trailing-dotdot": "NORMAL/..",
    "empty-component": "NORMAL//a.jpeg",
    "leading-slash": "/NORMAL/a.jpeg",
    "trailing-slash-placeholder": "NORMAL/",
    "300-byte-component": "NORMAL/" + "c" * 295 + ".jpeg",
    "partial-suffix": "NORMAL/a.jpeg.partial",
    "backslash": "NORMAL\\a.jpeg",
    "unicode-and-url-syntax": "NORMAL/ünï 名前 +%2F?#;&=.jpeg",
}


def content_for(name: str) -> bytes:
    """Distinct bytes per name; nothing for a trailing-slash "folder" placeholder, as the console
    makes them."""
    return b"" if name.endswith("/") else name.encode() + bytes(range(256))


def listed_names(client, bucket_name: str, **kwargs) -> list[str]:
    return [blob.name for blob in client.list_blobs(bucket_name, **kwargs)]


def page_names(client, bucket_name: str, **kwargs) -> list[list[str]]:
    """The object names of each page the server answered, in order."""
    return [[blob.name for blob in page]
            for page in client.list_blobs(bucket_name, **kwargs).pages]


def upload_all(bucket, names) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: bucket.blob(name).upload_from_string(content_for(name)), names))


@pytest.fixture(scope="module")
def many_objects(gcs_emulator_url) -> tuple[str, list[str]]:
    """A bucket holding MANY small objects under many/, shared by the paging tests; its name and
    the object names (numbered without padding, so name order is not upload order)."""
    names = [f"many/{number}.jpeg" for number in range(MANY)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_url)
        client = storage.Client(project="test-project")
        bucket = client.create_bucket(f"test-many-{uuid.uuid4().hex[:12]}")
        upload_all(bucket, names)
        client.close()
    return bucket.name, names


# --- Object names are kept verbatim ---


@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_an_odd_but_valid_name_round_trips(gcs_client, gcs_bucket, name, tmp_path):
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob(name).upload_from_string(content_for(name))

    listed = list(gcs_client.list_blobs(gcs_bucket))
    assert [blob.name for blob in listed] == [name]
    assert bucket.get_blob(name).size == len(content_for(name))
    assert bucket.blob(name).exists()
    assert bucket.blob(name).download_as_bytes() == content_for(name)
    listed[0].download_to_filename(tmp_path / "downloaded")  # through the listed mediaLink
    assert (tmp_path / "downloaded").read_bytes() == content_for(name)

    bucket.blob(name).delete()
    assert not bucket.blob(name).exists()
    assert bucket.get_blob(name) is None
    assert listed_names(gcs_client, gcs_bucket) == []


def test_a_slash_b_and_a_double_slash_b_are_two_objects(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("a/b.jpeg").upload_from_string(b"single")
    bucket.blob("a//b.jpeg").upload_from_string(b"double")

    assert listed_names(gcs_client, gcs_bucket) == ["a//b.jpeg", "a/b.jpeg"]
    assert bucket.blob("a/b.jpeg").download_as_bytes() == b"single"
    assert bucket.blob("a//b.jpeg").download_as_bytes() == b"double"


def test_deleting_one_of_two_names_that_normalise_alike_keeps_the_other(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("a/b.jpeg").upload_from_string(b"single")
    bucket.blob("a//b.jpeg").upload_from_string(b"double")

    bucket.blob("a//b.jpeg").delete()

    assert listed_names(gcs_client, gcs_bucket) == ["a/b.jpeg"]
    assert bucket.blob("a/b.jpeg").download_as_bytes() == b"single"


def test_names_that_normalise_to_the_same_path_are_all_distinct_objects(gcs_client, gcs_bucket):
    names = ["a/b.jpeg", "a//b.jpeg", "/a/b.jpeg", "a/b.jpeg/", "a/./b.jpeg", "x/../a/b.jpeg",
             "a\\b.jpeg", "a/b.jpeg/."]
    bucket = gcs_client.bucket(gcs_bucket)
    upload_all(bucket, names)

    assert listed_names(gcs_client, gcs_bucket) == sorted(names)
    assert {name: bucket.blob(name).download_as_bytes() for name in names} == {
        name: content_for(name) for name in names}


def test_a_prefix_matches_names_as_plain_strings(gcs_client, gcs_bucket):
    names = ["a/b.jpeg", "a//b.jpeg", "a/../b.jpeg", "/a/b.jpeg", "a\\b.jpeg", "ab.jpeg"]
    upload_all(gcs_client.bucket(gcs_bucket), names)

    assert listed_names(gcs_client, gcs_bucket, prefix="a/") == ["a/../b.jpeg", "a//b.jpeg",
                                                                   "a/b.jpeg"]
    assert listed_names(gcs_client, gcs_bucket, prefix="/") == ["/a/b.jpeg"]


def test_a_chunked_resumable_upload_keeps_the_name_verbatim(gcs_client, gcs_bucket):
    name = "runs//r1/../saved_model/variables.data"
    content = bytes(range(256)) * 2400  # 600 KiB: three 256 KiB chunks
    blob = gcs_client.bucket(gcs_bucket).blob(name, chunk_size=256 * 1024)
    blob.upload_from_string(content)

    assert listed_names(gcs_client, gcs_bucket) == [name]
    assert gcs_client.bucket(gcs_bucket).blob(name).download_as_bytes() == content


# --- Listings come in pages ---


def test_a_large_listing_is_complete_in_name_order_over_pages_of_1000(gcs_client, many_objects):
    bucket_name, names = many_objects

    pages = page_names(gcs_client, bucket_name, prefix="many/")

    assert [len(page) for page in pages] == [1000, 1000, 500]
    assert [name for page in pages for name in page] == sorted(names)


def test_a_page_size_above_1000_still_gets_pages_of_1000(gcs_client, many_objects):
    bucket_name, names = many_objects

    pages = page_names(gcs_client, bucket_name, page_size=5000)

    assert [len(page) for page in pages] == [1000, 1000, 500]
    assert [name for page in pages for name in page] == sorted(names)


def test_a_smaller_page_size_is_honoured(gcs_client, gcs_bucket):
    names = [f"data/{number}.jpeg" for number in range(20)]
    upload_all(gcs_client.bucket(gcs_bucket), names)

    pages = page_names(gcs_client, gcs_bucket, page_size=7)

    assert [len(page) for page in pages] == [7, 7, 6]
    assert [name for page in pages for name in page] == sorted(names)


def test_max_results_returns_the_first_names_in_one_page(gcs_client, many_objects):
    bucket_name, names = many_objects

    assert page_names(gcs_client, bucket_name, max_results=5) == [sorted(names)[:5]]


def test_a_page_token_continues_after_the_previous_page(gcs_client, gcs_bucket):
    names = [f"data/{number}.jpeg" for number in range(10)]
    upload_all(gcs_client.bucket(gcs_bucket), names)
    first = gcs_client.list_blobs(gcs_bucket, page_size=4)
    first_page = [blob.name for blob in next(first.pages)]

    rest = listed_names(gcs_client, gcs_bucket, page_token=first.next_page_token)

    assert first_page == sorted(names)[:4]
    assert rest == sorted(names)[4:]


def test_prefixes_and_objects_share_a_page(gcs_client, gcs_bucket):
    names = ["0.jpeg", "1/a.jpeg", "1/b.jpeg", "2.jpeg", "3/c.jpeg"]
    upload_all(gcs_client.bucket(gcs_bucket), names)

    iterator = gcs_client.list_blobs(gcs_bucket, delimiter="/", page_size=2)
    pages = [([blob.name for blob in page], sorted(page.prefixes)) for page in iterator.pages]

    assert pages == [(["0.jpeg"], ["1/"]), (["2.jpeg"], ["3/"])]


def test_an_invalid_page_token_is_a_bad_request(gcs_client, gcs_bucket):
    with pytest.raises(exceptions.BadRequest):
        listed_names(gcs_client, gcs_bucket, page_token="not-a-token")


# --- Generations and preconditions, as GCS applies them ---
# Without object versioning (the job's buckets have none) only the live generation of a name can
# be read; any request may name the generation it expects (ifGenerationMatch, 0: no live object)
# and is refused with 412 when the live object does not match, before anything changes.

SMALL = b"small: one multipart request"
LARGE = bytes(range(256)) * 2400  # 600 KiB, with chunk_size 256 KiB: a resumable upload


def upload(bucket, name: str, content: bytes, **conditions):
    """Uploads through the client as the job does: multipart, or resumable in 256 KiB chunks for
    the large content; returns the blob (its generation set from the response)."""
    blob = bucket.blob(name, chunk_size=256 * 1024 if len(content) > 256 * 1024 else None)
    blob.upload_from_string(content, **conditions)
    return blob


@pytest.mark.parametrize("content", [SMALL, LARGE], ids=["multipart", "resumable"])
def test_if_generation_match_0_creates_an_absent_object(gcs_client, gcs_bucket, content):
    blob = upload(gcs_client.bucket(gcs_bucket), "run/MANIFEST.json", content,
                  if_generation_match=0)
    assert blob.generation and blob.download_as_bytes() == content


@pytest.mark.parametrize("content", [SMALL, LARGE], ids=["multipart", "resumable"])
def test_if_generation_match_0_refuses_to_replace_a_live_object(gcs_client, gcs_bucket, content):
    bucket = gcs_client.bucket(gcs_bucket)
    upload(bucket, "run/MANIFEST.json", b"the first writer's")
    with pytest.raises(exceptions.PreconditionFailed):
        upload(bucket, "run/MANIFEST.json", content, if_generation_match=0)
    assert bucket.blob("run/MANIFEST.json").download_as_bytes() == b"the first writer's"


@pytest.mark.parametrize("content", [SMALL, LARGE], ids=["multipart", "resumable"])
def test_if_generation_match_replaces_only_the_generation_named(gcs_client, gcs_bucket, content):
    bucket = gcs_client.bucket(gcs_bucket)
    first = upload(bucket, "run/model.keras", b"first")
    second = upload(bucket, "run/model.keras", b"second")
    with pytest.raises(exceptions.PreconditionFailed):
        upload(bucket, "run/model.keras", content, if_generation_match=first.generation)
    third = upload(bucket, "run/model.keras", content, if_generation_match=second.generation)
    assert bucket.blob("run/model.keras").download_as_bytes() == content
    assert first.generation < second.generation < third.generation


def test_a_resumable_upload_checks_its_precondition_when_it_completes(gcs_client, gcs_bucket):
    """Two resumable uploads both started while the name was absent: the one that completes
    second is refused, as GCS evaluates the precondition on completion."""
    from google.auth.transport.requests import AuthorizedSession
    from google.resumable_media.requests import ResumableUpload

    session = AuthorizedSession(gcs_client._credentials)
    url = (f"{gcs_client._connection.API_BASE_URL}/upload/storage/v1/b/{gcs_bucket}/o"
           "?uploadType=resumable&ifGenerationMatch=0")
    uploads = []
    for content in (b"A" * 10, b"B" * 10):
        upload_ = ResumableUpload(url, 256 * 1024)
        upload_.initiate(session, io.BytesIO(content), {"name": "run/MANIFEST.json"},
                         "application/octet-stream")
        uploads.append(upload_)
    uploads[0].transmit_next_chunk(session)
    with pytest.raises(Exception) as refused:
        uploads[1].transmit_next_chunk(session)
    assert "412" in str(refused.value)
    assert gcs_client.bucket(gcs_bucket).blob("run/MANIFEST.json").download_as_bytes() == b"A" * 10


def test_a_delete_with_if_generation_match_spares_a_newer_generation(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    first = upload(bucket, "run/WRITER.json", b"old claim")
    upload(bucket, "run/WRITER.json", b"new claim")
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("run/WRITER.json").delete(if_generation_match=first.generation)
    assert bucket.blob("run/WRITER.json").download_as_bytes() == b"new claim"


def test_a_metadata_read_with_if_generation_match_is_refused_for_another(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    first = upload(bucket, "run/WRITER.json", b"old claim")
    second = upload(bucket, "run/WRITER.json", b"new claim")
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.get_blob("run/WRITER.json", if_generation_match=first.generation)
    assert bucket.get_blob("run/WRITER.json", if_generation_match=second.generation).size == 9


def test_a_download_gets_the_generation_it_asks_for_or_not_found(gcs_client, gcs_bucket, tmp_path):
    """A blob listed (or read) before its name was overwritten names its generation: GCS
    without versioning answers 404 for it rather than the newer bytes."""
    bucket = gcs_client.bucket(gcs_bucket)
    upload(bucket, "run/metrics.json", b"first")
    listed = next(iter(gcs_client.list_blobs(gcs_bucket)))
    assert listed.download_as_bytes() == b"first"
    upload(bucket, "run/metrics.json", b"second")
    with pytest.raises(exceptions.NotFound):
        listed.download_as_bytes()
    with pytest.raises(exceptions.NotFound):
        listed.download_to_filename(tmp_path / "old")
    assert bucket.blob("run/metrics.json").download_as_bytes() == b"second"
    newest = bucket.get_blob("run/metrics.json")
    assert bucket.blob("run/metrics.json", generation=newest.generation).download_as_bytes() \
        == b"second"


def test_a_download_says_which_generation_it_served(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    uploaded = upload(bucket, "run/WRITER.json", b"claim")
    read = bucket.get_blob("run/WRITER.json")
    read.download_as_bytes()
    assert read.generation == uploaded.generation and read.metageneration == 1
