{
  "variables": {
    # 1: AddressSanitizer + UndefinedBehaviorSanitizer (scripts/test-sanitize.mjs sets it through
    # GYP_DEFINES and builds in its own directory, so build/Release stays the plain addon).
    "sanitize%": 0
  },
  "targets": [
    {
      "target_name": "pagemirror",
      "sources": [
        "native/sys/mem.cc",
        "native/sys/uffd.cc",
        "native/sys/pagemap.cc",
        "native/sys/access.cc",
        "native/sys/fault_service.cc",
        "native/sys/file.cc",
        "native/sys/fork.cc",
        "native/sys/unix_socket.cc",
        "native/engine/mirror.cc",
        "native/engine/mirror_file.cc",
        "native/engine/migrate.cc",
        "native/engine/lease.cc",
        "native/engine/device.cc",
        "native/engine/link.cc",
        "native/engine/engine.cc",
        "native/engine/fork_device.cc",
        "native/engine/pager.cc",
        "native/engine/region.cc",
        "native/engine/trace_recorder.cc",
        "native/engine/replay.cc",
        "native/engine/fault_server.cc",
        "native/binding/errors.cc",
        "native/binding/mapping.cc",
        "native/binding/userfaultfd.cc",
        "native/binding/service.cc",
        "native/binding/access.cc",
        "native/binding/introspect.cc",
        "native/binding/device.cc",
        "native/binding/fork_device.cc",
        "native/binding/pager.cc",
        "native/binding/trace.cc",
        "native/binding/fault_server.cc",
        "native/binding/addon.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "_GNU_SOURCE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
      "cflags_cc": ["-std=c++17", "-O2", "-fexceptions", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
      "libraries": ["-pthread"],
      "conditions": [
        ["sanitize==1", {
          "cflags": ["-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"],
          "cflags_cc": ["-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"],
          "ldflags": ["-fsanitize=address,undefined"]
        }]
      ]
    },
    {
      "target_name": "uffd_baseline",
      "type": "executable",
      "sources": ["bench/c/uffd_baseline.c"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra"],
      "libraries": ["-pthread"]
    },
    {
      "target_name": "pager_c",
      "type": "executable",
      "sources": ["bench/c/pager_c.c"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra"],
      "libraries": ["-pthread"]
    },
    {
      "target_name": "pagemirror_client",
      "type": "static_library",
      "sources": ["native/client/pagemirror_client.c"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fPIC"],
      "direct_dependent_settings": {"include_dirs": ["native/client"]}
    },
    {
      "target_name": "pagemirror_client_demo",
      "type": "executable",
      "sources": ["native/client/pm_demo.c"],
      "dependencies": ["pagemirror_client"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra"],
      "libraries": ["-pthread"]
    },
    {
      "target_name": "pagemirror_client_fuzz",
      "type": "executable",
      "sources": ["native/client/pm_fuzz.c"],
      "dependencies": ["pagemirror_client"],
      "libraries": ["-pthread"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra"]
    },
    {
      "target_name": "pagemirror_preload",
      "type": "shared_library",
      "product_extension": "so",
      "sources": ["native/client/preload.c"],
      "ldflags": ["-Wl,--exclude-libs,ALL"],
      "dependencies": ["pagemirror_client"],
      "libraries": ["-pthread"],
      "cflags": ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fPIC"]
    }
  ]
}
