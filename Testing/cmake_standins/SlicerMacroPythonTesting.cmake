# Stand-in for slicer_add_python_unittest (Slicer v5.10.0 a2b6d08, CMake/SlicerMacroPythonTesting.cmake): registers
# py_<TESTNAME_PREFIX><script name without extension> with the real command: the Slicer launcher with --no-splash
# --testing, SLICER_ARGS, --additional-module-paths <build>/<qt-scripted-modules> (an extension build) and
# --python-code running slicer.testing.runUnitTest([<current binary dir>, <script's folder>], <test name>); RUN_SERIAL.
# No TIMEOUT is set: ctest's default (1500 s) applies unless the caller sets one. Here the launcher is
# slicer_launcher.py (the module's unittest in the Slicer-like Python).
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  if(NOT DEFINED MY_SCRIPT)
    message(FATAL_ERROR "SCRIPT is mandatory")
  endif()
  get_filename_component(_test_name ${MY_SCRIPT} NAME_WE)
  get_filename_component(_script_source_dir ${MY_SCRIPT} PATH)
  if("${_script_source_dir}" STREQUAL "")
    set(_script_source_dir ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  set(_module_paths --additional-module-paths ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    ${CMAKE_BINARY_DIR}/${Slicer_CLIMODULES_LIB_DIR} ${CMAKE_BINARY_DIR}/${Slicer_QTLOADABLEMODULES_LIB_DIR})
  add_test(NAME py_${MY_TESTNAME_PREFIX}${_test_name}
    COMMAND ${Slicer_LAUNCHER_EXECUTABLE} --no-splash --testing ${MY_SLICER_ARGS} ${_module_paths}
    --python-code "import slicer.testing\\; slicer.testing.runUnitTest(['${CMAKE_CURRENT_BINARY_DIR}', '${_script_source_dir}'], '${_test_name}')")
  set_property(TEST py_${MY_TESTNAME_PREFIX}${_test_name} PROPERTY RUN_SERIAL TRUE)
endmacro()
