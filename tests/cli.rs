//! Command line, `-t`, exit codes and configuration errors.

use std::process::{Command, Output};

use crate::util::*;

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn with_config(yaml: &str, args: &[&str]) -> Output {
    let dir = TempDir::new();
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.push(path.to_str().unwrap());
    run(&all)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const OLD_FORMAT: &str = include_str!("fixtures/patroni_proxy.yaml");

#[test]
fn test_flag_accepts_the_old_patroni_proxy_format() {
    let o = with_config(OLD_FORMAT, &["-t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is valid"));
    let o = with_config(OLD_FORMAT, &["--test", "-c"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn test_flag_reads_the_files_of_the_old_tls_block() {
    let o = with_config(include_str!("fixtures/patroni_proxy_tls.yaml"), &["-t"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    for key in [
        "ca_cert: /etc/patroni-proxy/ca.pem",
        "client_cert: /etc/patroni-proxy/client.pem",
    ] {
        let want = format!("clusters.my_cluster.tls.{key}: no such file");
        assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    }
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let o = with_config(
        "clusters:\n  main:\n    hosts: [\"http://a:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leeder]}\n",
        &["-t"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(r#"clusters.main.ports.rw.roles[0]: unknown role "leeder"; expected leader, sync, async"#), "{}", stderr(&o));

    let o = with_config("clusters: {}\nlisten_adress: 1\n", &["-t"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown field `listen_adress`"),
        "{}",
        stderr(&o)
    );

    let o = with_config(
        "clusters:\n  a:\n    hosts: [\"ftp://x\"]\n    ports:\n      p: {listen: \"0.0.0.0:6432\", roles: [any]}\n      q: {listen: \"127.0.0.1:6432\", roles: [any]}\n",
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "a bad config fails without -t too"
    );
    let e = stderr(&o);
    assert!(
        e.contains("clusters.a.hosts[0]: \"ftp://x\" is not an http:// or https:// URL"),
        "{e}"
    );
    assert!(
        e.contains(
            "clusters.a.ports.q.listen: 127.0.0.1:6432 clashes with clusters.a.ports.p.listen"
        ),
        "{e}"
    );

    let o = run(&["-t", "/nonexistent/patroni-proxy.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read"));
}

/// What `-t` used to pass although the proxy could not start as written
/// (issue 11): each is exit 2 with the key path, and no password is shown.
#[test]
fn test_flag_catches_configs_that_cannot_start_as_written() {
    let cases = [
        (
            "clusters:\n  a:\n    hosts: [\"http://h:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leader]}\n      rw: {listen: \"127.0.0.1:6433\", roles: [leader]}\n",
            "clusters.a.ports: duplicate entry with key \"rw\"",
        ),
        (
            "clusters:\n  a:\n    hosts: [\"http://h:99999\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leader]}\n",
            "clusters.a.hosts[0]: \"http://h:99999\" has port \"99999\"",
        ),
        (
            "clusters:\n  a:\n    hosts: [\"http://h:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leader]}\n      ro: {listen: \"[::ffff:127.0.0.1]:6432\", roles: [any]}\n",
            "clusters.a.ports.rw.listen: 127.0.0.1:6432 clashes with clusters.a.ports.ro.listen",
        ),
        (
            "clusters:\n  a:\n    hosts: [\"http://admin:s3cret@h:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leader]}\n",
            "\"http://***@h:8008\" carries credentials",
        ),
    ];
    for (yaml, want) in cases {
        let o = with_config(yaml, &["-t"]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{yaml}\n{e}");
        assert!(e.contains(want), "want {want:?} in {e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}

#[test]
fn a_port_that_cannot_bind_is_fatal() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "listen_address: 127.0.0.1:{}\nclusters:\n  a:\n    hosts: [\"http://127.0.0.1:9\"]\n    ports:\n      p: {{listen: \"127.0.0.1:{port}\", roles: [any]}}\n",
        free_port()
    );
    let o = with_config(&yaml, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("bind 127.0.0.1:{port}: Address already in use")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_version_and_usage_errors() {
    let o = run(&["-V"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("patroni-proxy "));
    let o = run(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("usage: patroni-proxy"));
    let o = run(&["--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown option --frobnicate"));
    let o = run(&["a.yaml", "b.yaml"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn example_config_is_valid_and_every_key_and_route_is_documented() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example = format!("{root}/packaging/patroni-proxy.example.yaml");
    let o = run(&["-t", &example]);
    assert!(o.status.success(), "{}", stderr(&o));
    let man5 = std::fs::read_to_string(format!("{root}/man/patroni-proxy.5")).unwrap();
    let text = std::fs::read_to_string(&example).unwrap();
    let names = ["main", "rw", "ro"]; // cluster and port names, not keys
    let mut keys = 0;
    for line in text.lines() {
        let t = line.trim_start();
        let Some((key, _)) = t.split_once(':') else {
            continue;
        };
        if t.starts_with('#')
            || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            || names.contains(&key)
        {
            continue;
        }
        keys += 1;
        assert!(
            man5.contains(&format!(".B {key}\n")) || man5.contains(&format!("\\fB{key}\\fR")),
            "config key {key} is not documented in man/patroni-proxy.5"
        );
    }
    assert!(keys >= 20, "{keys} keys found in the example");
    // The keys of the blocks the example has commented out (they name
    // files), from the list serde gives for an unknown key.
    for (yaml, at_least) in [
        (
            "clusters:\n  a:\n    hosts: [\"https://x\"]\n    tls: {nope: 1}\n    ports: {}\n",
            8,
        ),
        ("admin: {nope: 1}\nclusters: {}\n", 3),
        ("admin: {tls: {nope: 1}}\nclusters: {}\n", 5),
        ("admin: {allow: {nope: 1}}\nclusters: {}\n", 2),
    ] {
        let err = stderr(&with_config(yaml, &["-t"]));
        let listed = err.split_once("expected ").expect("a list of keys").1;
        let keys: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
        assert!(keys.len() >= at_least, "{err}");
        for key in keys {
            assert!(
                man5.contains(&format!(".B {key}\n")),
                "key {key} is not documented in man/patroni-proxy.5"
            );
            let commented = |l: &str| {
                let l = l.trim_start().strip_prefix('#').unwrap_or("").trim_start();
                l.starts_with(&format!("{key}:"))
            };
            assert!(
                text.lines().any(commented),
                "key {key} is not in the example"
            );
        }
    }
    let man1 = std::fs::read_to_string(format!("{root}/man/patroni-proxy.1")).unwrap();
    for (path, _) in patroni_proxy::admin::Route::ALL {
        assert!(
            man1.contains(&format!(".B GET {path}\n")),
            "admin route {path} is not in man/patroni-proxy.1"
        );
    }
}

/// The modules of ours a module (a file in `src/`, or all of `src/proxy/`)
/// names as `crate::x` or `patroni_proxy::x`.
fn uses_of(root: &str, module: &str) -> std::collections::BTreeSet<String> {
    let files: Vec<std::path::PathBuf> = if module == "proxy" {
        std::fs::read_dir(format!("{root}/src/proxy"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    } else {
        vec![format!("{root}/src/{module}.rs").into()]
    };
    let mut out = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for prefix in ["crate::", "patroni_proxy::"] {
            for (i, _) in text.match_indices(prefix) {
                let name: String = text[i + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn the_dependency_line_in_lib_rs_matches_the_imports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let lib = std::fs::read_to_string(format!("{root}/src/lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join(" ");
    let start = doc.find("Dependency direction").expect("a dependency line");
    let doc = &doc[start..];
    let mut checked = 0;
    for part in doc.split('`').skip(1).step_by(2) {
        let Some((from, to)) = part.split_once(" -> ") else {
            continue;
        };
        let want: std::collections::BTreeSet<String> = to
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        assert_eq!(uses_of(root, from), want, "lib.rs says `{part}`");
        checked += 1;
    }
    assert!(checked >= 5, "{checked} arrows checked");
    let leaves = doc.split(" depend on nothing of ours").next().unwrap();
    let leaves = leaves.rsplit(". ").next().unwrap();
    for leaf in leaves.split('`').skip(1).step_by(2) {
        assert!(
            uses_of(root, leaf).is_empty(),
            "{leaf} depends on {:?}",
            uses_of(root, leaf)
        );
    }
}

#[test]
fn the_readme_layout_lists_every_source_file_and_names_real_functions() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let mut sources = String::new();
    for dir in ["src", "src/proxy"] {
        for e in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "rs") {
                let rel = format!("{dir}/{}", path.file_name().unwrap().to_string_lossy());
                assert!(
                    readme.contains(&format!("| `{rel}` |")),
                    "{rel} is missing from the README's Layout"
                );
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let life = readme
        .split("### Life of a connection")
        .nth(1)
        .expect("a Life of a connection section");
    let life = life.split("\n#").next().unwrap();
    let mut named = 0;
    for quoted in life.split('`').skip(1).step_by(2) {
        let Some((_, f)) = quoted.split_once("::") else {
            continue;
        };
        assert!(
            sources.contains(&format!("fn {f}(")),
            "the README names {quoted}, which is not a function in src/"
        );
        named += 1;
    }
    assert!(named >= 15, "{named} functions named");
}
