//! Media URLs of a request: `data:` URLs (base64, written to a temporary file) and `file://`
//! paths under the server's media root. Anything else is refused.
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use vl_runtime::model::Media;

use crate::error::ApiError;

/// What a content part shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An `image_url` part.
    Image,
    /// A `video_url` part.
    Video,
}

/// A request's media, with the temporary file it lives in (removed when this is dropped).
#[derive(Debug)]
pub struct Resolved {
    /// What the engine decodes.
    pub media: Media,
    /// The decoded `data:` URL, kept until the request is over.
    pub temp: Option<NamedTempFile>,
    /// The media's identity for the prefix cache: its kind and a SHA-256 of its bytes.
    pub key: String,
}

/// Turns a media URL into what the engine reads; `media_root` is canonical (or `None`:
/// `file://` URLs are refused).
pub fn resolve(kind: Kind, url: &str, media_root: Option<&Path>) -> Result<Resolved, ApiError> {
    let param = match kind {
        Kind::Image => "image_url",
        Kind::Video => "video_url",
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let (path, temp) = from_data_url(rest).map_err(|e| e.param(param))?;
        let key = content_key(kind, &path)?;
        return Ok(Resolved { media: media(kind, path), temp: Some(temp), key });
    }
    if let Some(path) = url.strip_prefix("file://") {
        let path = from_file_url(path, media_root).map_err(|e| e.param(param))?;
        let key = content_key(kind, &path)?;
        return Ok(Resolved { media: media(kind, path), temp: None, key });
    }
    let scheme = url.split_once(':').map_or("(none)", |(s, _)| s);
    Err(ApiError::invalid(format!(
        "unsupported media URL scheme {scheme:?}: use a data: URL (base64) or a file:// path under the server's media root"
    ))
    .param(param))
}

/// `video:<sha256>` or `image:<sha256>` of the file's bytes (read once more; hashing runs far
/// faster than decoding).
fn content_key(kind: Kind, path: &Path) -> Result<String, ApiError> {
    let unreadable = |e: std::io::Error| ApiError::invalid(format!("{} cannot be read: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(unreadable)?;
    let kind = match kind {
        Kind::Image => "image",
        Kind::Video => "video",
    };
    Ok(format!("{kind}:{}", hex::encode(hasher.finalize())))
}

fn media(kind: Kind, path: PathBuf) -> Media {
    match kind {
        Kind::Image => Media::ImageFile(path),
        Kind::Video => Media::VideoFile(path),
    }
}

/// `data:[<mime>][;base64],<data>` (without `data:`) into a temporary file named after the
/// media type, so that ffmpeg sees a familiar extension.
fn from_data_url(rest: &str) -> Result<(PathBuf, NamedTempFile), ApiError> {
    let (meta, data) = rest.split_once(',').ok_or_else(|| ApiError::invalid("a data: URL needs a comma"))?;
    let mut params = meta.split(';');
    let mime = params.next().unwrap_or("").to_ascii_lowercase();
    if !params.any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid("only base64 data: URLs are supported"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid(format!("the data: URL is not valid base64: {e}")))?;
    let ext = match mime.as_str() {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "image/bmp" => "bmp",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "video/quicktime" => "mov",
        "video/x-matroska" => "mkv",
        "video/x-msvideo" => "avi",
        _ => "bin",
    };
    let mut temp = tempfile::Builder::new()
        .prefix("vl-serve-")
        .suffix(&format!(".{ext}"))
        .tempfile()
        .map_err(|e| ApiError::internal(format!("could not create a temporary file: {e}")))?;
    temp.write_all(&bytes).map_err(|e| ApiError::internal(format!("could not write a temporary file: {e}")))?;
    temp.flush().map_err(|e| ApiError::internal(format!("could not write a temporary file: {e}")))?;
    Ok((temp.path().to_path_buf(), temp))
}

/// A `file://` path (without `file://`), canonicalized (symlinks resolved) and required to
/// lie under `media_root`.
fn from_file_url(path: &str, media_root: Option<&Path>) -> Result<PathBuf, ApiError> {
    let root = media_root.ok_or_else(|| {
        ApiError::invalid("file:// URLs are disabled on this server (it was started without --media-root)")
    })?;
    // `file://localhost/x` names the same file as `file:///x`.
    let path = path.strip_prefix("localhost").unwrap_or(path);
    if !path.starts_with('/') {
        return Err(ApiError::invalid("a file:// URL needs an absolute path (file:///...)"));
    }
    let outside = || ApiError::invalid(format!("{path} is not under the server's media root"));
    let canonical = std::fs::canonicalize(path).map_err(|_| outside())?;
    if !canonical.starts_with(root) {
        return Err(outside());
    }
    if !canonical.is_file() {
        return Err(ApiError::invalid(format!("{path} is not a file")));
    }
    Ok(canonical)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_become_files() {
        let r = resolve(Kind::Image, "data:image/png;base64,aGVsbG8=", None).unwrap();
        let Media::ImageFile(path) = &r.media else { panic!("not an image file: {:?}", r.media) };
        assert_eq!(std::fs::read(path).unwrap(), b"hello");
        assert!(path.to_string_lossy().ends_with(".png"));
        let same = resolve(Kind::Image, "data:image/jpeg;base64,aGVsbG8=", None).unwrap();
        let other = resolve(Kind::Image, "data:image/png;base64,aGVsbG9v", None).unwrap();
        assert_eq!(r.key, same.key, "the key is the content's, not the URL's");
        assert_ne!(r.key, other.key);
        assert!(resolve(Kind::Image, "data:image/png,hello", None).is_err());
        assert!(resolve(Kind::Image, "data:image/png;base64,@@", None).is_err());
    }

    #[test]
    fn file_urls_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("in.mp4"), b"x").unwrap();
        std::fs::write(dir.path().join("out.mp4"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("out.mp4"), root.join("link.mp4")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        let url = |p: &Path| format!("file://{}", p.display());
        let ok = resolve(Kind::Video, &url(&root.join("in.mp4")), Some(&root)).unwrap();
        assert!(matches!(ok.media, Media::VideoFile(_)));
        for bad in [root.join("link.mp4"), root.join("../out.mp4"), dir.path().join("out.mp4"), root.join("none")] {
            let e = resolve(Kind::Video, &url(&bad), Some(&root)).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(resolve(Kind::Video, &url(&root.join("in.mp4")), None).is_err());
        assert!(resolve(Kind::Video, "https://example.com/a.mp4", Some(&root)).is_err());
    }
}
