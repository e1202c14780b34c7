fn main() {
    std::process::exit(drfs::cli::main());
}
