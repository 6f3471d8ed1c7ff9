//! The man pages and shell completions generated from the clap definitions
//! (examples/gen_docs.rs, what the .deb ships) cover every subcommand and option.

#[path = "../examples/gen_docs.rs"]
mod gen_docs;

use std::collections::BTreeSet;

/// Every visible subcommand, with the visible long options it takes.
fn subcommands() -> Vec<(String, Vec<String>)> {
    let mut cmd = fvd::cli::command();
    cmd.build();
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| {
            let longs = s
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long())
                .map(|l| format!("--{l}"))
                .collect();
            (s.get_name().to_string(), longs)
        })
        .collect()
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn one_man_page_per_subcommand_listing_its_options() {
    let d = tempfile::tempdir().unwrap();
    gen_docs::generate(d.path()).unwrap();
    let subs = subcommands();
    assert!(subs.len() >= 9, "{subs:?}");
    assert!(subs.iter().any(|(n, _)| n == "serve"));

    let pages: BTreeSet<String> = std::fs::read_dir(d.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut want: BTreeSet<String> = subs.iter().map(|(n, _)| format!("fvd-{n}.1")).collect();
    want.insert("fvd.1".into());
    assert_eq!(pages, want);

    let top = read(&d.path().join("man/fvd.1"));
    let source = format!("\"fvd {}\"", fvd::cli::VERSION);
    assert!(top.contains(".TH fvd 1"), "{top}");
    for (name, longs) in &subs {
        assert!(
            top.contains(&format!("fvd\\-{name}(1)")),
            "fvd.1 lacks {name}"
        );
        let page = read(&d.path().join(format!("man/fvd-{name}.1")));
        let th = page.lines().find(|l| l.starts_with(".TH ")).unwrap_or("");
        assert!(th.starts_with(&format!(".TH fvd-{name} 1")), "{th}");
        assert!(th.contains(&source), "{th} lacks the version");
        for l in longs {
            // roff escapes '-' as '\-'.
            let roff = l.replace('-', "\\-");
            assert!(page.contains(&roff), "fvd-{name}.1 lacks {l}");
        }
    }
    // A hidden option stays out of the page.
    let serve = read(&d.path().join("man/fvd-serve.1"));
    assert!(!serve.contains("signal\\-each\\-completion"));
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_subcommand_and_option() {
    let d = tempfile::tempdir().unwrap();
    gen_docs::generate(d.path()).unwrap();
    for (shell, file) in gen_docs::COMPLETIONS {
        let text = read(&d.path().join("completions").join(file));
        for (name, longs) in subcommands() {
            assert!(text.contains(&name), "{shell} completion lacks {name}");
            for l in longs {
                // fish spells options as `-l name`, bash and zsh as `--name`.
                let fish = format!("-l {}", &l[2..]);
                assert!(
                    text.contains(&l) || text.contains(&fish),
                    "{shell} completion lacks {name} {l}"
                );
            }
        }
    }
}

#[test]
fn a_second_run_replaces_the_first() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("man")).unwrap();
    std::fs::write(d.path().join("man/fvd-gone.1"), "stale").unwrap();
    gen_docs::generate(d.path()).unwrap();
    assert!(!d.path().join("man/fvd-gone.1").exists());
    assert!(d.path().join("man/fvd-serve.1").exists());
}
