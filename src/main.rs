fn main() -> std::process::ExitCode {
    dms_retrofit::cli::main()
}
