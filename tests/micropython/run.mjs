// Runs a Python script under a real MicroPython interpreter (the WebAssembly port, npm package
// @micropython/micropython-webassembly-pyscript) with chosen repository files in its filesystem.
//
//   node tests/micropython/run.mjs --module-dir ROOT --modules smartx_device/cbor.py,... \
//        --script tests/micropython/check_core.py [options] [-- script args]
//
// Options (docs/micropython.md has the why of each):
//   --module-dir DIR     directory the --modules paths are relative to (the repository root)
//   --modules A,B,...    files copied into the interpreter's filesystem under the same relative
//                        paths; each package directory also gets its __init__.py from DIR
//   --bare-packages      give package directories an empty __init__.py instead of DIR's
//   --script PATH        the script to run (as __main__, by execfile: tracebacks name it)
//   --vectors DIR        JSON files copied to tests/vectors/ (default DIR/tests/vectors)
//   --heap SIZE          starting GC heap, bytes or with k/m suffix (default 256k)
//   --max-heap SIZE      fail (exit 3) if the GC heap had to grow past SIZE
//   --pystack WORDS      Python stack in 4-byte words (default 2048, as the port's default)
//   --frozen-lib         keep the port's frozen micropython-lib modules (abc, hmac, base64,
//                        functools, datetime, ...) importable; hidden by default because a
//                        board's firmware does not carry them
//   --json-out PATH      write a JSON summary of the run to PATH
//   -- ARGS...           become sys.argv[1:] of the script
//
// Exit status: 0 the script (and every RUNNER_STEPS function) returned; 1 it raised (traceback
// on stderr); 2 the runner could not start (bad arguments, files or npm package missing);
// 3 the heap outgrew --max-heap.
//
// This port collects garbage only between top-level calls from JavaScript (gc.collect() inside
// a call just marks a collection pending). A script that wants collections between phases
// defines RUNNER_STEPS, a list of functions: after the script body the runner calls each in
// its own top-level call. The runner sets the global _RUNNER_CALLS_STEPS = True first, so a
// script can run its steps itself when run elsewhere (CPython, the unix port).

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const PACKAGE = "@micropython/micropython-webassembly-pyscript";
const APP_DIR = "/app"; // the interpreter's working directory; '' on sys.path resolves here

class UsageError extends Error {}

function parseSize(text, flag) {
    const match = /^(\d+)([kKmM]?)$/.exec(text || "");
    if (!match) {
        throw new UsageError(`${flag} takes a byte count like 262144, 256k or 1m, not ${JSON.stringify(text)}`);
    }
    const unit = { "": 1, k: 1024, m: 1024 * 1024 }[match[2].toLowerCase()];
    return parseInt(match[1], 10) * unit;
}

function parseArgs(argv) {
    const options = {
        moduleDir: null, modules: [], script: null, vectors: null, heap: 256 * 1024,
        maxHeap: null, pystack: 2048, frozenLib: false, barePackages: false, jsonOut: null,
        scriptArgs: [],
    };
    for (let i = 0; i < argv.length; i++) {
        const flag = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
            return argv[++i];
        };
        switch (flag) {
            case "--module-dir": options.moduleDir = value(); break;
            case "--modules": options.modules.push(...value().split(",").map((s) => s.trim()).filter(Boolean)); break;
            case "--script": options.script = value(); break;
            case "--vectors": options.vectors = value(); break;
            case "--heap": options.heap = parseSize(value(), flag); break;
            case "--max-heap": options.maxHeap = parseSize(value(), flag); break;
            case "--pystack": options.pystack = parseSize(value(), flag); break;
            case "--frozen-lib": options.frozenLib = true; break;
            case "--bare-packages": options.barePackages = true; break;
            case "--json-out": options.jsonOut = value(); break;
            case "--": options.scriptArgs = argv.slice(i + 1); i = argv.length; break;
            case "-h": case "--help":
                process.stdout.write(fs.readFileSync(new URL(import.meta.url), "utf8").split("\n\n")[0] + "\n");
                process.exit(0);
                break;
            default: throw new UsageError(`unknown argument ${JSON.stringify(flag)} (see --help)`);
        }
    }
    if (!options.moduleDir) throw new UsageError("--module-dir is required");
    if (!options.script) throw new UsageError("--script is required");
    if (options.heap < 16 * 1024) throw new UsageError("--heap below 16k cannot even start the interpreter");
    options.moduleDir = path.resolve(options.moduleDir);
    options.vectors = path.resolve(options.vectors || path.join(options.moduleDir, "tests", "vectors"));
    return options;
}

// Byte sinks that keep stdout/stderr order and never lose a last line without a newline.
function lineSink(fd) {
    let pending = [];
    const sink = {
        capture: null, // when an array, lines go there instead of the fd
        partial: false, // the last byte written was not a newline
        push(byte) {
            pending.push(byte);
            if (byte === 10) sink.flush();
        },
        flush() {
            if (!pending.length) return;
            const chunk = Buffer.from(pending);
            pending = [];
            if (sink.capture) {
                sink.capture.push(chunk.toString("utf8"));
            } else {
                fs.writeSync(fd, chunk);
                sink.partial = chunk[chunk.length - 1] !== 10;
            }
        },
    };
    return sink;
}

function repoRelative(file, moduleDir) {
    if (path.isAbsolute(file) || file.split(/[\\/]/).includes("..")) {
        throw new UsageError(`module path ${JSON.stringify(file)} must be relative to --module-dir, without '..'`);
    }
    return file.split(path.sep).join("/");
}

function makeDirs(FS, dir) {
    let current = "";
    for (const part of dir.split("/").filter(Boolean)) {
        current += "/" + part;
        if (!FS.analyzePath(current).exists) FS.mkdir(current);
    }
}

function copyIn(FS, source, target) {
    if (!fs.existsSync(source) || !fs.statSync(source).isFile()) {
        throw new UsageError(`no such file: ${source}`);
    }
    makeDirs(FS, path.posix.dirname(target));
    FS.writeFile(target, fs.readFileSync(source));
}

// The Python the runner sends; strings are passed through JSON, whose escapes Python reads.
const py = (value) => JSON.stringify(value);

async function loadPackage() {
    const require = createRequire(import.meta.url);
    let entry;
    try {
        entry = require.resolve(`${PACKAGE}/micropython.mjs`);
    } catch (error) {
        throw new UsageError(`the npm package ${PACKAGE} is not installed: run \`npm install\` at the repository root`);
    }
    return import(entry);
}

function exitCodeOfSystemExit(message) {
    const last = message.trim().split("\n").pop() || "";
    const value = last.replace(/^SystemExit:?\s*/, "");
    if (value === "" || value === "None" || value === "0") return 0;
    return /^\d+$/.test(value) ? parseInt(value, 10) : 1;
}

async function main() {
    const started = Date.now();
    const options = parseArgs(process.argv.slice(2));
    const { loadMicroPython } = await loadPackage();
    const out = lineSink(1);
    const err = lineSink(2);
    const mp = await loadMicroPython({
        heapsize: options.heap,
        pystack: options.pystack,
        linebuffer: false,
        stdout: (bytes) => bytes.forEach((b) => out.push(b)),
        stderr: (bytes) => bytes.forEach((b) => err.push(b)),
    });
    const FS = mp.FS;
    makeDirs(FS, APP_DIR);
    FS.chdir(APP_DIR);

    // Modules, and an __init__.py for every package directory they sit in.
    const modules = options.modules.map((m) => repoRelative(m, options.moduleDir));
    const packages = new Set();
    for (const module of modules) {
        copyIn(FS, path.join(options.moduleDir, module), `${APP_DIR}/${module}`);
        const parts = module.split("/").slice(0, -1);
        for (let i = 1; i <= parts.length; i++) packages.add(parts.slice(0, i).join("/"));
    }
    for (const pkg of packages) {
        const init = `${pkg}/__init__.py`;
        if (modules.includes(init)) continue;
        const source = path.join(options.moduleDir, init);
        if (!options.barePackages && fs.existsSync(source)) copyIn(FS, source, `${APP_DIR}/${init}`);
        else FS.writeFile(`${APP_DIR}/${init}`, "");
    }
    // Vectors: every JSON file, where check scripts look for them.
    if (fs.existsSync(options.vectors)) {
        for (const name of fs.readdirSync(options.vectors).sort()) {
            if (name.endsWith(".json")) {
                copyIn(FS, path.join(options.vectors, name), `${APP_DIR}/tests/vectors/${name}`);
            }
        }
    }
    // The script, under its repository path when it lives in the repository.
    const scriptSource = path.resolve(options.script);
    const inside = path.relative(options.moduleDir, scriptSource);
    const scriptPath = !inside.startsWith("..") && !path.isAbsolute(inside)
        ? inside.split(path.sep).join("/") : path.basename(scriptSource);
    copyIn(FS, scriptSource, `${APP_DIR}/${scriptPath}`);

    const prelude = [
        "import sys",
        // Frozen micropython-lib modules would hide what a board's firmware lacks.
        options.frozenLib ? "" : "if '.frozen' in sys.path: sys.path.remove('.frozen')",
        `sys.argv[:] = ${py([scriptPath, ...options.scriptArgs])}`,
        "_RUNNER_CALLS_STEPS = True",
        "del sys",
    ].join("\n");

    const summary = {
        ok: false, exit_code: 0, script: scriptPath, modules, error: null, steps: 0,
        heap: { start: options.heap, max: options.maxHeap, total: null }, elapsed_ms: 0,
    };
    const fail = (error, code) => {
        out.flush();
        err.flush();
        if (out.partial) fs.writeSync(1, "\n"); // end a print(..., end="") before the traceback
        out.partial = false;
        if (error.name !== "PythonError") throw error;
        if (error.type === "SystemExit") {
            const exitCode = exitCodeOfSystemExit(error.message);
            if (exitCode === 0) return false;
            summary.exit_code = exitCode;
        } else {
            summary.exit_code = code;
        }
        // Drop the runner's own frame: the first frame in <stdin> is its execfile line.
        const trace = error.message.replace(/\n  File "<stdin>", line \d+, in <module>/, "");
        summary.error = { type: error.type, traceback: trace };
        fs.writeSync(2, trace.endsWith("\n") ? trace : trace + "\n");
        return true;
    };

    let failed = false;
    try {
        mp.runPython(prelude);
        mp.runPython(`execfile(${py(scriptPath)})`);
        mp.runPython("_runner_steps = len(RUNNER_STEPS) if 'RUNNER_STEPS' in globals() else 0");
        summary.steps = mp.globals.get("_runner_steps");
        for (let i = 0; i < summary.steps && !failed; i++) {
            // One top-level call per step: the port collects garbage between them.
            try {
                mp.runPython(`RUNNER_STEPS[${i}]()`);
            } catch (error) {
                failed = fail(error, 1);
            }
        }
    } catch (error) {
        failed = fail(error, 1);
    }
    out.flush();
    err.flush();

    // How large the GC heap had to become ("GC: total: N" of micropython.mem_info()).
    const captured = [];
    out.capture = captured;
    mp.runPython("import micropython\nmicropython.mem_info()");
    out.flush();
    out.capture = null;
    const total = /GC: total: (\d+)/.exec(captured.join(""));
    summary.heap.total = total ? parseInt(total[1], 10) : null;
    if (!failed && options.maxHeap !== null && summary.heap.total !== null && summary.heap.total > options.maxHeap) {
        summary.exit_code = 3;
        summary.error = { type: "HeapExceeded", traceback: "" };
        fs.writeSync(2, `run.mjs: the GC heap grew to ${summary.heap.total} bytes, past --max-heap ${options.maxHeap}\n`);
        failed = true;
    }
    summary.ok = !failed;
    summary.elapsed_ms = Date.now() - started;
    if (options.jsonOut) fs.writeFileSync(options.jsonOut, JSON.stringify(summary, null, 1) + "\n");
    return summary.exit_code;
}

main().then(
    (code) => { process.exitCode = code; },
    (error) => {
        // Print only the message: the package is one minified line that a stack would dump.
        const text = error instanceof UsageError ? error.message : `${error.name}: ${error.message}`;
        fs.writeSync(2, `run.mjs: ${text}\n`);
        process.exitCode = 2;
    },
);
