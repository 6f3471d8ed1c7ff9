fn main() {
    std::process::exit(fvd::cli::main());
}
