# tests/python.cmake - the Python package (python/kdkit) under Debian's
# /usr/bin/python3 with python3-numpy and python3-torch (installed by
# scripts/install-deps.sh): one CTest entry per tests/python/test_kdkit_*.py,
# plain unittest.  Python cannot load a sanitized libkdkit, so in an ASan or
# fuzz build the tests use the gcc -O3 build that `make test` makes anyway
# (build-release-check), brought up to date by the python_libkdkit fixture;
# otherwise this build's own libkdkit.so.  The kdkit command and the
# gpt_logits helper are this build's.
add_executable(gpt_logits ${CMAKE_CURRENT_SOURCE_DIR}/python/gpt_logits.c)
target_link_libraries(gpt_logits PRIVATE kdkit_static)

if(KD_SANITIZE OR KD_FUZZ)
  set(KD_PY_PLAIN ${PROJECT_SOURCE_DIR}/build-release-check)
  set(KD_PY_LIB ${KD_PY_PLAIN}/libkdkit.so)
  add_test(NAME python_libkdkit
           COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/python/plain_lib.sh ${PROJECT_SOURCE_DIR}
                   ${KD_PY_PLAIN})
  set_tests_properties(python_libkdkit PROPERTIES TIMEOUT 600 FIXTURES_SETUP kd_python_lib)
else()
  set(KD_PY_LIB $<TARGET_FILE:kdkit>)
endif()

file(GLOB KD_PY_TESTS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/python/test_kdkit_*.py)
foreach(py ${KD_PY_TESTS})
  get_filename_component(name ${py} NAME_WE)
  string(REPLACE "test_kdkit_" "python_" tname ${name})
  add_test(NAME ${tname} COMMAND /usr/bin/python3 -B ${py} -v)
  set_tests_properties(${tname} PROPERTIES TIMEOUT 300
    ENVIRONMENT "KDKIT_LIBRARY=${KD_PY_LIB};KDKIT=$<TARGET_FILE:kdkit_cli>;KD_GPT_LOGITS=$<TARGET_FILE:gpt_logits>;KD_SOURCE_DIR=${PROJECT_SOURCE_DIR};KD_PY_WORK=${CMAKE_CURRENT_BINARY_DIR}/python/${name}")
  if(KD_SANITIZE OR KD_FUZZ)
    set_tests_properties(${tname} PROPERTIES FIXTURES_REQUIRED kd_python_lib)
  endif()
endforeach()

# `make python`'s environment step (scripts/python-venv.sh), into a scratch
# venv: /usr/bin/python3's venv sees numpy and torch and imports kdkit.
add_test(NAME python_venv
         COMMAND sh -c "rm -rf \"$1\" && sh \"$2\" \"$1\" && \"$1/bin/python\" -B -c 'import kdkit, numpy, torch; print(kdkit.library_path)'"
                 sh ${CMAKE_CURRENT_BINARY_DIR}/python/venv ${PROJECT_SOURCE_DIR}/scripts/python-venv.sh)
set_tests_properties(python_venv PROPERTIES TIMEOUT 120
  ENVIRONMENT "KDKIT_LIBRARY=${KD_PY_LIB}")
if(KD_SANITIZE OR KD_FUZZ)
  set_tests_properties(python_venv PROPERTIES FIXTURES_REQUIRED kd_python_lib)
endif()
